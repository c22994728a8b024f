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
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from overlay_kill import KILL_AT_STEP
from conformance import DriverConformance, open_driver, reopen, tree_state  # noqa: E402

from csi.host import mount as mnt  # noqa: E402
from csi.errors import IncompatibleFilesystem, InvalidArgument  # noqa: E402
from csi.graphdriver.driver import LayerState  # noqa: E402
from csi.graphdriver.overlay.driver import OverlayDriver  # noqa: E402
from csi.graphdriver.overlay.layout import derived_short  # noqa: E402


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
    with pytest.raises(InvalidArgument, match="not a directory"):  # one codec, one rule: refused
        overlay.apply_diff("y", None, stream)
    assert os.listdir(outside) == []
    assert os.readlink(overlay.layout.diff("y") / "escape") == str(outside)


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


def _own_entries(root: Path) -> dict[str, str]:
    """Relative path -> kind of everything in a diff dir ("whiteout", "opaque dir", ...)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if _is_whiteout(path):
                found[rel] = "whiteout"
            elif path.is_dir() and not path.is_symlink():
                opaque = b"y" == (os.getxattr(path, "trusted.overlay.opaque") if "trusted.overlay.opaque"
                                  in os.listxattr(path) else b"")
                found[rel] = "opaque dir" if opaque else "dir"
            else:
                found[rel] = "file"
    return found


def _settled(drv: OverlayDriver) -> None:
    """Let the upper dir's ctimes age past the driver's trust margin (lowered by the tests)."""
    time.sleep(2 * drv.trust_margin_ns / 1e9)


def test_mounted_freeze_again_copies_only_the_changes(overlay: OverlayDriver) -> None:
    overlay.trust_margin_ns = 50_000_000  # 50 ms: more than a clock tick, ns timestamps on ext4
    _base_with_tree(overlay)  # base: gone, dir/old, kept
    overlay.create("w", "base")
    path = overlay.get("w")
    try:
        (path / "same-size").write_bytes(b"a" * 100)
        (path / "untouched").write_bytes(os.urandom(5000))
        (path / "to-delete").write_text("bye")
        (path / "replace-me").mkdir()
        (path / "replace-me" / "inner").write_text("inner")
        (path / "mode").write_text("mode")
        (path / "attr").write_text("attr")
        (path / "linked-a").write_text("linked")
        os.link(path / "linked-a", path / "linked-b")
        (path / "gains-link").write_text("gains")
        (path / "sub" / "deeper").mkdir(parents=True)
        (path / "sub" / "deeper" / "leaf").write_text("leaf")
        (path / "sub" / "deeper" / "changes").write_text("one")
        (path / os.fsdecode(b"raw-\xff")).write_text("a name that is not UTF-8")
        _settled(overlay)
        overlay.freeze("w", "s1")
        _settled(overlay)
        st = os.stat(path / "same-size")
        (path / "same-size").write_bytes(b"b" * 100)  # same size, mtime put back
        os.utime(path / "same-size", ns=(st.st_atime_ns, st.st_mtime_ns))
        (path / "to-delete").unlink()
        shutil.rmtree(path / "replace-me")
        (path / "replace-me").mkdir()
        (path / "replace-me" / "new").write_text("new")
        os.chmod(path / "mode", 0o600)
        os.setxattr(path / "attr", "user.note", b"set")
        os.link(path / "gains-link", path / "new-link")
        (path / "kept").unlink()  # from the base layer: a whiteout in the upper dir
        shutil.rmtree(path / "dir")  # from the base layer: an opaque dir replaces it
        (path / "dir").mkdir()
        (path / "dir" / "fresh").write_text("fresh")
        (path / "sub" / "deeper" / "changes").write_text("two")
        os.chmod(path / os.fsdecode(b"raw-\xff"), 0o640)
        expected = tree_state(path)
        overlay.freeze("w", "s2")
        (path / "after").write_text("not in s2")
    finally:
        overlay.put("w")
    assert overlay.layer("s2").parent == "s1" and overlay.layer("s2").extra["freeze"] == "delta"
    assert overlay.layer("s1").parent == "base" and overlay.layer("w").parent == "base"
    with mounted(overlay, "s2") as view:
        assert tree_state(view) == expected
    assert _own_entries(overlay.layout.diff("s2")) == {
        "same-size": "file", "to-delete": "whiteout", "replace-me": "dir", "replace-me/inner": "whiteout",
        "replace-me/new": "file", "mode": "file", "attr": "file", "gains-link": "file", "new-link": "file",
        "kept": "whiteout", "dir": "opaque dir", "dir/fresh": "file", "sub": "dir", "sub/deeper": "dir",
        "sub/deeper/changes": "file", os.fsdecode(b"raw-\xff"): "file",
    }
    own = overlay.layout.diff("s2")
    assert os.stat(own / "gains-link").st_ino == os.stat(own / "new-link").st_ino
    # a clone of the stacked snapshot sees the same; s1 removed first stays until s2 goes
    overlay.create("clone", "s2")
    with mounted(overlay, "clone") as view:
        assert tree_state(view) == expected
    overlay.remove("clone")
    overlay.remove("s1")
    assert not overlay.exists("s1") and overlay.layout.layer_dir("s1").is_dir()
    overlay.remove("s2")
    assert not overlay.layout.layer_dir("s1").exists() and not overlay.layout.layer_dir("s2").exists()


def test_mounted_freezes_stack_until_the_depth_limit(overlay: OverlayDriver) -> None:
    overlay.trust_margin_ns = 20_000_000
    overlay.max_delta_depth = 2  # type: ignore[misc]
    overlay.create("w")
    with mounted(overlay, "w") as path:
        for i in range(5):
            (path / f"file{i}").write_text(str(i))
            _settled(overlay)
            overlay.freeze("w", f"s{i}")
            with mounted(overlay, f"s{i}") as view:
                assert tree_state(view) == tree_state(path)
    parents = [overlay.layer(f"s{i}").parent for i in range(5)]
    assert parents == [None, "s0", "s1", None, "s3"]  # s3: a full copy again


def test_mounted_freeze_after_other_freezes_or_a_new_layer_copies_in_full(overlay: OverlayDriver) -> None:
    overlay.trust_margin_ns = 20_000_000
    overlay.create("w")
    with mounted(overlay, "w") as path:
        (path / "f").write_text("1")
        _settled(overlay)
        overlay.freeze("w", "m1")
    overlay.freeze("w", "u1")  # unmounted: w is rebased onto u1, m1's index no longer fits
    with mounted(overlay, "w") as path:
        (path / "g").write_text("2")
        overlay.freeze("w", "m2")
    assert overlay.layer("m2").parent == "u1" and overlay.layer("m2").extra["freeze"] == "copy"
    with mounted(overlay, "w") as path:  # a remount keeps the upper dir's inodes: still exact
        (path / "h").write_text("3")
        overlay.freeze("w", "m3")
        expected = tree_state(path)
    assert overlay.layer("m3").parent == "m2"
    with mounted(overlay, "m3") as view:
        assert tree_state(view) == expected
    overlay.remove("w")
    overlay.create("w", "u1")  # the same ID again: another layer, m3's index is not its own
    with mounted(overlay, "w") as path:
        (path / "g").write_text("other")
        overlay.freeze("w", "m4")
    assert overlay.layer("m4").parent == "u1" and overlay.layer("m4").extra["freeze"] == "copy"


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

_FREEZE_CHILD = KILL_AT_STEP + r"""
import sys
kill_at(sys.argv[3])
drv = OverlayDriver(sys.argv[1])
drv.trust_margin_ns = 20_000_000
if sys.argv[2] != "unmounted":
    drv.get("w")
if sys.argv[2] == "again-removed":
    build = upperdelta.build
    def removing_first(*args, **kwargs):
        drv.remove("first")  # hidden, not removed: the freeze in progress stacks on it
        return build(*args, **kwargs)
    upperdelta.build = removing_first
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
    # a second mounted freeze: only the changes, stacked on the first ("first")
    ("again", "freeze-copy:recorded", False),
    ("again", "freeze-copy:copied", False),
    ("again", "freeze-copy:moved", True),
    ("again-removed", "freeze-copy:copied", False),
    ("again-removed", "freeze-copy:moved", True),
]


@pytest.mark.parametrize(("how", "step", "committed"), _STEPS, ids=[f"{h}-{s}" for h, s, _ in _STEPS])
def test_kill_9_inside_freeze(ext4_dir: Path, how: str, step: str, committed: bool) -> None:
    """The child process SIGKILLs itself at ``step`` (``KILL_AT_STEP`` wraps the driver
    method at that step); a restart must finish or roll back, never lose content.
    ``again``: the layer was frozen while mounted before ("first") and changed since, so
    the freeze stacks the changes on "first"; ``again-removed``: "first" is removed
    (hidden) while that freeze runs."""
    home = ext4_dir / "overlay"
    drv = OverlayDriver(home)
    drv.trust_margin_ns = 20_000_000
    drv.create("w")
    with mounted(drv, "w") as path:
        (path / "data").write_bytes(b"precious" * 1000)
        (path / "sub").mkdir()
        (path / "sub" / "file").write_text("deep")
        (path / "kept").write_text("kept")
        if how.startswith("again"):
            _settled(drv)
            drv.freeze("w", "first")
            _settled(drv)
            (path / "data").write_bytes(b"changed" * 1000)
            (path / "sub" / "file").unlink()
            (path / "new").write_text("new")
        expected = tree_state(path)
    drv.store.close()
    proc = subprocess.run([sys.executable, "-c", _FREEZE_CHILD, str(home), how, step],
                          capture_output=True, text=True)
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
            assert restarted.layer("snap").parent == ("first" if how.startswith("again") else None)
        else:
            assert restarted.layer("w").parent is None
        if how == "again-removed":  # hidden while it has a child, freed with the rolled-back one
            assert not restarted.exists("first")
            assert (restarted.store.get("first") is not None) == committed
        restarted.freeze("w", "again")  # the layer works normally afterwards


# --------------------------------------------------------------------------- against vfs


class _StackCountingOverlay(OverlayDriver):
    """Overlay with a trust margin short enough for the state machine's steps (20 ms: more
    than this kernel's 4 ms tick, ns timestamps on ext4 and btrfs), counting the mounted
    freezes that stacked only the changes on the last one."""

    trust_margin_ns = 20_000_000
    stacked = 0

    def _freeze(self, source: Any, frozen: Any) -> str | None:
        new_parent = super()._freeze(source, frozen)
        if self.store.require(frozen.id).extra.get("freeze") == "delta":
            type(self).stacked += 1
        return new_parent


def _copied_up_hard_link(drv: Any, layer_id: str, rel: str, follow: bool) -> Callable[[], str | None] | None:
    """Overlay (index=off) copies a lower file up on its first change, breaking its hard
    links: for a hard-linked lower file at ``rel``, a probe that names it (relative to the
    root) once an operation copied it up."""
    root = Path(drv.get(layer_id))
    try:
        path = Path(os.path.realpath(root / rel) if follow else
                    os.path.join(os.path.realpath((root / rel).parent), (root / rel).name))
        if os.path.commonpath([root, path]) != str(root) or path == root:
            return None
        try:
            st = os.lstat(path)
        except OSError:  # missing, or a symlink loop: the operation fails before any copy-up
            return None
        inside = str(path.relative_to(root))
        upper = drv.layout.diff(layer_id) / inside
        if stat.S_ISDIR(st.st_mode) or st.st_nlink < 2 or os.path.lexists(upper):
            return None
        return lambda: inside if os.path.lexists(upper) else None
    finally:
        drv.put(layer_id)


def test_state_machine_overlay_on_ext4_against_vfs(ext4_dir: Path, scratch_root: Path) -> None:
    """Random file operations, freezes (mounted: a copy of the upper dir, or of its changes
    since the last mounted freeze; unmounted: rename) and clones, with native diff round
    trips, compared step by step with vfs."""
    from test_statemachine import run_driver_state_machine

    reference = scratch_root / f"sm-ref-{ext4_dir.name}"
    reference.mkdir()
    _StackCountingOverlay.stacked = 0
    run_driver_state_machine(_StackCountingOverlay, ext4_dir, reference, copy_up=_copied_up_hard_link)
    assert _StackCountingOverlay.stacked >= 5, "the machine hardly ever froze a layer while mounted twice"


def test_state_machine_overlay_on_btrfs_against_vfs(btrfs_dir: Path, ext4_dir: Path) -> None:
    from test_statemachine import run_driver_state_machine

    _StackCountingOverlay.stacked = 0
    run_driver_state_machine(_StackCountingOverlay, btrfs_dir, ext4_dir, max_examples=6,
                             copy_up=_copied_up_hard_link)
    assert _StackCountingOverlay.stacked >= 1


def _frozen_with_content(drv: OverlayDriver) -> None:
    """Frozen layer ``f`` holding ``f`` = "kept" (frozen from writable layer ``w``)."""
    drv.create("w")
    (Path(drv.get("w")) / "f").write_text("kept")
    drv.put("w")
    drv.freeze("w", "f")


def test_creations_a_power_cut_lost_are_made_again(ext4_dir: Path) -> None:
    """A new writable layer's directories, link file and ``l/`` symlink are not fsynced: a
    power cut may drop them while the ready record survives. Start-up makes them again — the
    layer was empty, and its short name follows from its ID. (The cut is modelled by removing
    what it could drop; the power-cut lane in tests/qemu cuts real power.)"""
    home = ext4_dir / "overlay"
    with open_driver(OverlayDriver, home) as drv:
        _frozen_with_content(drv)
        drv.create("gone", "f")
        drv.create("unlinked", "f")
        short = drv.layout.short("unlinked")
        assert short == derived_short("unlinked")
    shutil.rmtree(home / "layers" / "gone")
    (home / "l" / short).unlink()
    (home / "layers" / "unlinked" / "link").write_text("")  # data never reached the disk
    with open_driver(OverlayDriver, home) as drv:
        for name in ("gone", "unlinked"):
            assert (Path(drv.get(name)) / "f").read_text() == "kept"
            drv.put(name)
        assert (home / "l" / short).is_symlink()


def test_a_link_file_a_power_cut_emptied_is_written_again_beside_its_surviving_link(ext4_dir: Path) -> None:
    """The likeliest cut: the ``l/`` symlink (metadata) reached the journal, the link file's
    data did not. The restart writes the file again; mounts use the same short name."""
    home = ext4_dir / "overlay"
    with open_driver(OverlayDriver, home) as drv:
        _frozen_with_content(drv)
        drv.create("child", "f")
    for name in ("f", "child"):
        (home / "layers" / name / "link").write_text("")
    with open_driver(OverlayDriver, home) as drv:
        for name in ("f", "child"):
            assert (home / "layers" / name / "link").read_text() == derived_short(name)
        assert (Path(drv.get("child")) / "f").read_text() == "kept"
        drv.put("child")


def test_a_random_short_name_keeps_its_link_across_a_power_cut(ext4_dir: Path) -> None:
    """A layer whose derived short name was taken got a random one (written durably in its
    link file); if a cut drops its ``l/`` symlink, the restart makes it again under that name,
    not the derived one (which belongs to another layer)."""
    home = ext4_dir / "overlay"
    with open_driver(OverlayDriver, home) as drv:
        _frozen_with_content(drv)
        os.symlink("../layers/f/diff", home / "l" / derived_short("taken"))  # as if another layer held it
        drv.create("taken", "f")
        short = drv.layout.short("taken")
        assert short != derived_short("taken")
    (home / "l" / short).unlink()
    with open_driver(OverlayDriver, home) as drv:
        assert os.readlink(home / "l" / short) == "../layers/taken/diff"
        assert drv.layout.short("taken") == short
        assert (Path(drv.get("taken")) / "f").read_text() == "kept"
        drv.put("taken")
        os.unlink(home / "l" / derived_short("taken"))
