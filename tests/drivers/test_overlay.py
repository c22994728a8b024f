"""The overlay driver on the real kernel: the shared conformance suite on ext4 and on
btrfs (loop file), plus overlay's own checks (whiteout conversion, O(1) freeze, 500-deep
chains, kill -9 during freeze)."""

from __future__ import annotations

import io
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conformance import DriverConformance, open_driver, reopen, tree_state  # noqa: E402

from csi import mount as mnt  # noqa: E402
from csi.errors import IncompatibleFilesystem  # noqa: E402
from csi.graphdriver.metadata import LayerState  # noqa: E402
from csi.graphdriver.overlay import CRASH_ENV, OverlayDriver  # noqa: E402


class TestOverlayOnExt4(DriverConformance):
    max_depth = 500

    @pytest.fixture
    def driver(self, ext4_dir: Path) -> Iterator[OverlayDriver]:
        with open_driver(OverlayDriver, ext4_dir / "overlay") as drv:
            yield drv  # type: ignore[misc]


class TestOverlayOnBtrfs(DriverConformance):
    max_depth = 500

    @pytest.fixture
    def driver(self, btrfs_dir: Path) -> Iterator[OverlayDriver]:
        with open_driver(OverlayDriver, btrfs_dir / "overlay") as drv:
            yield drv  # type: ignore[misc]


# --------------------------------------------------------------------------- overlay's own


@pytest.fixture
def overlay(ext4_dir: Path) -> Iterator[OverlayDriver]:
    with open_driver(OverlayDriver, ext4_dir / "overlay") as drv:
        yield drv  # type: ignore[misc]


def _is_whiteout(path: Path) -> bool:
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _tar(members: list[tuple[str, bytes | None, dict[str, Any]]]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, attrs in members:
            info = tarfile.TarInfo(name)
            for key, value in attrs.items():
                setattr(info, key, value)
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    buf.seek(0)
    return buf


def _base_with_tree(drv: OverlayDriver) -> None:
    drv.create("w")
    with mounted(drv, "w") as path:
        (path / "gone").write_text("gone")
        (path / "dir").mkdir()
        (path / "dir" / "old").write_text("old")
        (path / "kept").write_text("kept")
    drv.freeze("w", "base")
    drv.remove("w")


@contextmanager
def mounted(drv: OverlayDriver, layer_id: str) -> Iterator[Path]:
    path = drv.get(layer_id)
    try:
        yield path
    finally:
        drv.put(layer_id)


def test_diff_converts_overlay_whiteouts_and_opaque_dirs(overlay: OverlayDriver) -> None:
    _base_with_tree(overlay)
    overlay.create("x", "base")
    with mounted(overlay, "x") as path:
        (path / "gone").unlink()
        shutil.rmtree(path / "dir")
        (path / "dir").mkdir()
        (path / "dir" / "new").write_text("new")
    upper = overlay.layout.diff("x")
    assert _is_whiteout(upper / "gone")  # the kernel's form on disk
    assert os.getxattr(upper / "dir", "trusted.overlay.opaque") == b"y"
    with tarfile.open(fileobj=overlay.diff("x", "base"), mode="r|") as tar:
        members = {m.name.rstrip("/"): m for m in tar}
    assert members[".wh.gone"].isreg() and members[".wh.gone"].size == 0
    assert "gone" not in members
    assert members["dir/.wh..wh..opq"].isreg() and members["dir/new"].isreg()
    assert not any("trusted.overlay" in key for m in members.values() for key in m.pax_headers)
    names = list(members)
    assert names.index("dir") < names.index("dir/.wh..wh..opq") < names.index("dir/new")


def test_apply_writes_overlay_whiteouts_and_opaque_dirs(overlay: OverlayDriver) -> None:
    _base_with_tree(overlay)
    overlay.create("y", "base")
    stream = _tar([
        (".wh.gone", b"", {}),
        (".wh.never-existed", b"", {}),
        ("dir", None, {"type": tarfile.DIRTYPE, "mode": 0o750}),
        ("dir/.wh..wh..opq", b"", {}),
        ("dir/new", b"new", {"mode": 0o640}),
    ])
    assert overlay.apply_diff("y", "base", stream) == 3
    upper = overlay.layout.diff("y")
    assert _is_whiteout(upper / "gone")
    assert not os.path.lexists(upper / "never-existed"), "a whiteout with nothing below would show up"
    assert os.getxattr(upper / "dir", "trusted.overlay.opaque") == b"y"
    with mounted(overlay, "y") as path:
        assert sorted(os.listdir(path)) == ["dir", "kept"]
        assert sorted(os.listdir(path / "dir")) == ["new"]
        assert stat.S_IMODE(os.stat(path / "dir").st_mode) == 0o750


def test_apply_never_follows_symlinks_out_of_the_layer(overlay: OverlayDriver, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    overlay.create("y")
    stream = _tar([
        ("escape", None, {"type": tarfile.SYMTYPE, "linkname": str(outside)}),
        ("escape/planted", b"evil", {}),
    ])
    overlay.apply_diff("y", None, stream)
    assert os.listdir(outside) == []
    assert (overlay.layout.diff("y") / "escape" / "planted").read_bytes() == b"evil"


def test_apply_refuses_forged_overlay_xattrs(overlay: OverlayDriver) -> None:
    overlay.create("y")
    stream = _tar([("f", b"x", {"pax_headers": {"SCHILY.xattr.trusted.overlay.redirect": "/etc",
                                                  "SCHILY.xattr.user.ok": "1"}})])
    overlay.apply_diff("y", None, stream)
    names = os.listxattr(overlay.layout.diff("y") / "f")
    assert "user.ok" in names and "trusted.overlay.redirect" not in names


def test_unmounted_freeze_moves_no_data(overlay: OverlayDriver) -> None:
    overlay.create("w")
    with mounted(overlay, "w") as path:
        with open(path / "big", "wb") as f:
            f.truncate(256 << 20)
            f.write(b"head")
    before = os.stat(overlay.layout.diff("w") / "big")
    overlay.freeze("w", "snap")
    after = os.stat(overlay.layout.diff("snap") / "big")
    assert (after.st_ino, after.st_dev, after.st_ctime_ns) == (before.st_ino, before.st_dev, before.st_ctime_ns)
    assert overlay.layer("w").parent == "snap" and overlay.layer("snap").parent is None
    assert os.listdir(overlay.layout.diff("w")) == []
    assert (overlay.layout.layer_dir("w") / "lower").read_text() == f"l/{overlay.layout.short('snap')}"
    with mounted(overlay, "w") as path:
        assert (path / "big").stat().st_size == 256 << 20


def test_mounted_freeze_copies_the_upper_dir_only(overlay: OverlayDriver) -> None:
    _base_with_tree(overlay)
    overlay.create("w", "base")
    path = overlay.get("w")
    try:
        (path / "gone").unlink()
        (path / "added").write_text("added")
        overlay.freeze("w", "snap")
        (path / "after").write_text("not in the snapshot")
    finally:
        overlay.put("w")
    assert overlay.layer("w").parent == "base" and overlay.layer("snap").parent == "base"
    snap = overlay.layout.diff("snap")
    assert sorted(os.listdir(snap)) == ["added", "gone"] and _is_whiteout(snap / "gone")
    assert os.stat(snap / "added").st_ino != os.stat(overlay.layout.diff("w") / "added").st_ino
    with mounted(overlay, "snap") as view:
        assert sorted(os.listdir(view)) == ["added", "dir", "kept"]


def test_mount_description(overlay: OverlayDriver) -> None:
    _base_with_tree(overlay)
    overlay.create("w", "base")
    overlay.create("root")
    lay = overlay.layout
    desc = overlay.describe_mount(overlay.layer("w"), overlay.chain("w"))
    assert desc.fstype == "overlay" and desc.cwd == str(lay.links)
    assert f"lowerdir={lay.short('base')}" in desc.options
    assert f"upperdir={lay.diff('w')}" in desc.options and f"workdir={lay.work('w')}" in desc.options
    for opt in ("index=off", "redirect_dir=off", "metacopy=off", "xino=off"):
        assert opt in desc.options
    root = overlay.describe_mount(overlay.layer("root"), overlay.chain("root"))
    assert "lowerdir=../empty" in root.options
    frozen = overlay.describe_mount(overlay.layer("base"), overlay.chain("base"))
    assert frozen.options == ("bind", "ro") and frozen.source == str(lay.diff("base"))
    assert (lay.links / lay.short("base")).resolve() == lay.diff("base").resolve()


def test_stale_mount_without_reference_is_released_at_start(overlay: OverlayDriver) -> None:
    """A get killed between mounting and counting leaves a mount with mounts == 0."""
    overlay.create("w")
    layer = overlay.layer("w")
    overlay._activate(layer, overlay.chain("w"), "")
    assert overlay._is_active(layer)
    restarted = reopen(overlay)
    try:
        assert not restarted._is_active(layer)
        restarted.freeze("w", "snap")  # the O(1) path: safe only with nothing mounted
    finally:
        restarted.store.close()


def test_home_on_a_filesystem_without_upper_support(scratch_root: Path) -> None:
    base = scratch_root / f"ovl-{os.getpid()}"
    for sub in ("lower", "upper", "work", "merged"):
        (base / sub).mkdir(parents=True)
    m = mnt.Mount("overlay", "overlay", (f"lowerdir={base / 'lower'}", f"upperdir={base / 'upper'}",
                                         f"workdir={base / 'work'}"))
    mnt.mount(m, base / "merged")
    try:
        with pytest.raises(IncompatibleFilesystem, match="overlay cannot use overlay"):
            OverlayDriver(base / "merged" / "home")
        assert os.listdir(base / "merged") == []
    finally:
        mnt.unmount(base / "merged")


# --------------------------------------------------------------------------- kill -9 in a freeze

_FREEZE_CHILD = r"""
import os, sys
from csi.graphdriver.overlay import OverlayDriver
drv = OverlayDriver(sys.argv[1])
if sys.argv[2] == "mounted":
    drv.get("w")
drv.freeze("w", "snap")
print("finished", flush=True)
"""

_STEPS = [
    ("unmounted", "freeze-rename:recorded", False),
    ("unmounted", "freeze-rename:made", False),
    ("unmounted", "freeze-rename:moved", True),
    ("unmounted", "freeze-rename:fresh", True),
    ("unmounted", "freeze-rename:finished", True),
    ("mounted", "freeze-copy:copied", False),
    ("mounted", "freeze-copy:moved", True),
]


@pytest.mark.parametrize(("how", "step", "committed"), _STEPS, ids=[s for _, s, _ in _STEPS])
def test_kill_9_inside_freeze(ext4_dir: Path, how: str, step: str, committed: bool) -> None:
    """The child process SIGKILLs itself at ``step`` (STRATA_TEST_CRASH_AT, read only at
    the named crash points); a restart must finish or roll back, never lose content."""
    home = ext4_dir / "overlay"
    drv = OverlayDriver(home)
    drv.create("w")
    with mounted(drv, "w") as path:
        (path / "data").write_bytes(b"precious" * 1000)
        (path / "sub").mkdir()
        (path / "sub" / "file").write_text("deep")
        expected = tree_state(path)
    drv.store.close()
    proc = subprocess.run([sys.executable, "-c", _FREEZE_CHILD, str(home), how],
                          env={**os.environ, CRASH_ENV: step}, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    with open_driver(OverlayDriver, home) as restarted:
        assert all(l.state is LayerState.READY for l in restarted.store.all())
        assert restarted._on_disk() == {l.id for l in restarted.store.all()}
        assert restarted.exists("snap") == committed
        if how == "mounted":
            restarted.put("w")  # the child's reference died with it
        with mounted(restarted, "w") as path:  # type: ignore[arg-type]
            assert tree_state(path) == expected
        if committed:
            with mounted(restarted, "snap") as path:  # type: ignore[arg-type]
                assert tree_state(path) == expected
            assert restarted.layer("w").parent == ("snap" if how == "unmounted" else None)
        else:
            assert restarted.layer("w").parent is None
        restarted.freeze("w", "again")  # the layer works normally afterwards


# --------------------------------------------------------------------------- against vfs


def test_state_machine_overlay_on_ext4_against_vfs(ext4_dir: Path, scratch_root: Path) -> None:
    """Random file operations, freezes (mounted: copy; unmounted: rename) and clones,
    with native diff round trips, compared step by step with vfs."""
    from test_statemachine import run_driver_state_machine

    reference = scratch_root / f"sm-ref-{ext4_dir.name}"
    reference.mkdir()
    run_driver_state_machine(OverlayDriver, ext4_dir, reference)


def test_state_machine_overlay_on_btrfs_against_vfs(btrfs_dir: Path, ext4_dir: Path) -> None:
    from test_statemachine import run_driver_state_machine

    run_driver_state_machine(OverlayDriver, btrfs_dir, ext4_dir, max_examples=6)
