"""The diff half of the conformance suite: diff / apply / changes / diff_size checks.

:class:`DiffChecks` is a mixin of :class:`conformance.DriverConformance` (which gives it
``mounted``, ``frozen_base``, ``device_nodes`` and the ``driver`` fixture); a driver's
tests never use it directly. It checks: the round trip (applying ``diff(x, parent)`` on
``parent`` reproduces ``x`` exactly: content, modes, owners, xattrs, symlinks, hard
links, mtimes, deletions, opaque directories), also across two layers of changes;
whiteouts and opaque markers in the tar; the tar read by GNU ``tar`` and by
``tarfile``; applying a tar made by another tool; refusing members that leave the
layer; the changes list; ``diff_size`` equal to the stream's length.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar

import pytest

from csi.errors import InvalidArgument, NotFound
from csi.graphdriver.driver import ChangeKind
from csi.graphdriver.layered import LayerDriver
from layertree import T0, assert_same_tree, mutate, populate


class DiffChecks:
    """Diff checks; mixed into DriverConformance (see module docstring)."""

    device_nodes: ClassVar[bool]
    mounted: Callable[[LayerDriver, str], AbstractContextManager[Path]]
    frozen_base: Callable[..., str]

    def _diff_pair(self, driver: LayerDriver) -> tuple[str, str]:
        base = self.frozen_base(driver)
        driver.create("x", base)
        with self.mounted(driver, "x") as path:
            mutate(path)
        return base, "x"

    def test_diff_apply_round_trip(self, driver: LayerDriver) -> None:
        base, x = self._diff_pair(driver)
        stream = driver.diff(x, base)
        driver.create("y", base)
        written = driver.apply_diff("y", base, stream)
        assert written >= 100_000  # at least the new 100 kB file's content
        with self.mounted(driver, x) as xp, self.mounted(driver, "y") as yp:
            assert_same_tree(xp, yp)
        assert driver.changes("y", base) == driver.changes(x, base)

    def test_diff_of_a_layer_without_parent(self, driver: LayerDriver) -> None:
        driver.create("w")
        with self.mounted(driver, "w") as path:
            populate(path, device_nodes=self.device_nodes)
        driver.create("copy")
        driver.apply_diff("copy", None, driver.diff("w"))
        with self.mounted(driver, "w") as a, self.mounted(driver, "copy") as b:
            assert_same_tree(a, b)
        assert {c.kind for c in driver.changes("w")} == {ChangeKind.ADDED}

    def test_diff_apply_across_two_layers(self, driver: LayerDriver) -> None:
        base, x = self._diff_pair(driver)
        driver.freeze(x, "x-frozen")
        driver.create("x2", "x-frozen")
        with self.mounted(driver, "x2") as path:
            (path / "new-dir" / "inner" / "file").unlink()
            (path / "second").write_text("second layer")
            os.chmod(path / "replace-me", 0o711)
            shutil.rmtree(path / "bin")
        first, second = driver.diff("x-frozen", base), driver.diff("x2", "x-frozen")
        driver.create("y1", base)
        driver.apply_diff("y1", base, first)
        driver.freeze("y1", "y1-frozen")
        driver.create("y2", "y1-frozen")
        driver.apply_diff("y2", "y1-frozen", second)
        with self.mounted(driver, "x2") as a, self.mounted(driver, "y2") as b:
            assert_same_tree(a, b)

    def test_diff_has_whiteouts_and_opaque_dirs(self, driver: LayerDriver) -> None:
        base, x = self._diff_pair(driver)
        with tarfile.open(fileobj=driver.diff(x, base), mode="r:") as tar:
            members = {m.name.rstrip("/"): m for m in tar.getmembers()}
        names = set(members)
        assert "data/.wh.to-delete" in names
        assert "data/.wh.dir-to-delete" in names
        assert not any(n.startswith("data/dir-to-delete/") for n in names)
        assert "replace-me/.wh..wh..opq" in names and "replace-me/new" in names
        assert "new-dir/inner/file" in names and "etc/conf" in names
        group = {"hard-a", "hard-b", "data/hard-c"}
        assert "data/hard-c" in names
        assert any(m.islnk() and {m.name, m.linkname} <= group for m in members.values()), "hard link entry"
        assert "sparse" not in names and "etc/.wh.conf" not in names  # unchanged entries stay out
        assert members["etc/conf"].pax_headers.get("SCHILY.xattr.trusted.tag") == "\x00\x01binary"
        assert (members["data/deep/er/leaf"].uid, members["data/deep/er/leaf"].gid) == (42, 43)
        assert members["link-rel"].issym() and members["link-rel"].linkname == "bin/tool"

    def test_diff_readable_by_gnu_tar(self, driver: LayerDriver, tmp_path: Path) -> None:
        base, x = self._diff_pair(driver)
        archive = tmp_path / "layer.tar"
        with open(archive, "wb") as f:
            shutil.copyfileobj(driver.diff(x, base), f)
        listing = subprocess.run(["tar", "-tvf", str(archive)], capture_output=True, text=True, check=True)
        assert "new-dir/inner/file" in listing.stdout and "data/.wh.to-delete" in listing.stdout
        out = tmp_path / "out"
        out.mkdir()
        subprocess.run(["tar", "-xf", str(archive), "-C", str(out), "--xattrs", "--xattrs-include=*",
                        "--same-owner", "-p"], check=True)
        with self.mounted(driver, x) as xp:
            assert (out / "new-dir" / "inner" / "file").read_bytes() == (xp / "new-dir" / "inner" / "file").read_bytes()
            assert os.getxattr(out / "bin" / "tool", "user.added") == b"1"
            assert (out / "data" / "deep" / "er" / "leaf").stat().st_uid == 42
            assert os.readlink(out / "link-rel") == "bin/tool"

    def test_apply_foreign_tar_with_whiteouts(self, driver: LayerDriver) -> None:
        """An OCI layer made by another tool (here: tarfile by hand) applies correctly."""
        base = self.frozen_base(driver)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            def add(name: str, data: bytes | None = None, **kw: Any) -> None:
                info = tarfile.TarInfo(name)
                info.mtime = T0 // 10**9
                for k, v in kw.items():
                    setattr(info, k, v)
                if data is not None:
                    info.size = len(data)
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
            add("replace-me", type=tarfile.DIRTYPE, mode=0o755)
            add("replace-me/.wh..wh..opq", b"")
            add("replace-me/fresh", b"fresh", mode=0o600)
            add("data/.wh.to-delete", b"")
            add("data/.wh.dir-to-delete", b"")
            add("etc/.wh.conf", b"")
            add("etc/conf", b"recreated\n", mode=0o644)
            add("added-link", type=tarfile.LNKTYPE, linkname="hard-a")
        buf.seek(0)
        driver.create("y", base)
        written = driver.apply_diff("y", base, buf)
        assert written == len(b"fresh") + len(b"recreated\n")
        with self.mounted(driver, "y") as path:
            assert sorted(os.listdir(path / "replace-me")) == ["fresh"]
            assert not (path / "data" / "to-delete").exists() and not (path / "data" / "dir-to-delete").exists()
            assert (path / "etc" / "conf").read_text() == "recreated\n"
            assert os.stat(path / "added-link").st_ino == os.stat(path / "hard-a").st_ino
            assert (path / "data" / "deep" / "er" / "leaf").read_text() == "leaf"

    @pytest.mark.parametrize("name", ["../escape", "/abs/path", "a/../../escape"])
    def test_apply_rejects_escaping_members(self, driver: LayerDriver, name: str) -> None:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo(name)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
        buf.seek(0)
        driver.create("y")
        with pytest.raises(InvalidArgument):
            driver.apply_diff("y", None, buf)
        assert not (driver.home.parent / "escape").exists() and not Path("/abs/path").exists()

    def test_changes_list(self, driver: LayerDriver) -> None:
        base, x = self._diff_pair(driver)
        changes = {c.path: c.kind for c in driver.changes(x, base)}
        assert changes["/etc/conf"] is ChangeKind.MODIFIED
        assert changes["/bin/tool"] is ChangeKind.MODIFIED
        assert changes["/data/deep/er/leaf"] is ChangeKind.MODIFIED
        assert changes["/data/owned"] is ChangeKind.MODIFIED
        assert changes["/data/to-delete"] is ChangeKind.DELETED
        assert changes["/data/dir-to-delete"] is ChangeKind.DELETED
        assert changes["/new-dir"] is ChangeKind.ADDED and changes["/new-dir/inner/file"] is ChangeKind.ADDED
        assert changes["/data/hard-c"] is ChangeKind.ADDED
        assert changes["/link-rel"] is ChangeKind.MODIFIED
        assert "/sparse" not in changes and "/etc/conf/" not in changes
        assert "/data/dir-to-delete/sub" not in changes  # below a deleted dir: implied
        driver.create("same", base)
        assert driver.changes("same", base) == []

    def test_diff_size_agrees_with_stream(self, driver: LayerDriver) -> None:
        base, x = self._diff_pair(driver)
        assert driver.diff_size(x, base) == len(driver.diff(x, base).read())
        assert driver.diff_size(base) == len(driver.diff(base).read())
        driver.create("same", base)
        assert driver.diff_size("same", base) == len(driver.diff("same", base).read())

    def test_diff_stream_closed_early_releases_the_layers(self, driver: LayerDriver) -> None:
        base, x = self._diff_pair(driver)
        with self.mounted(driver, x) as path:
            (path / "large").write_bytes(os.urandom(1 << 20) * 6)  # more than the pipe and read buffers hold
        stream = driver.diff(x, base)
        assert len(stream.read(4096)) == 4096
        stream.close()  # the reader gives up mid-stream: the producer stops, its holds are released
        driver.remove(x)
        driver.remove(base)
        assert x not in driver._on_disk() and base not in driver._on_disk()

    def test_diff_needs_the_real_parent(self, driver: LayerDriver) -> None:
        with pytest.raises(NotFound):
            driver.diff("missing")
        driver.create("w")
        with pytest.raises(NotFound):
            driver.diff("w", "missing-parent")

    def test_apply_refuses_to_write_through_symlinks(self, driver: LayerDriver, tmp_path: Path) -> None:
        """A tar that plants a symlink and then writes or links through it stays inside.
        Refusing the tar (InvalidArgument) or replacing the symlink inside the layer are
        both fine; reaching the outside is not."""
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "secret").write_text("secret")
        for second in (
            dict(name="evil/planted", size=4),
            dict(name="grab", type=tarfile.LNKTYPE, linkname="evil/secret"),
        ):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
                link = tarfile.TarInfo("evil")
                link.type, link.linkname = tarfile.SYMTYPE, str(outside)
                tar.addfile(link)
                info = tarfile.TarInfo(str(second["name"]))
                for key, value in second.items():
                    setattr(info, key, value)
                tar.addfile(info, io.BytesIO(b"evil") if info.isreg() else None)
            buf.seek(0)
            layer = f"y{len(os.listdir(outside))}-{second['name'].replace('/', '-')}"
            driver.create(layer)
            try:
                driver.apply_diff(layer, None, buf)
            except InvalidArgument:
                pass
            assert sorted(os.listdir(outside)) == ["secret"]
            assert (outside / "secret").stat().st_nlink == 1
