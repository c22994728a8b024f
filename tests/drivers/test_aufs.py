"""The aufs driver. This kernel has no aufs, so:

* ``TestAufs`` (the shared conformance suite) skips, saying so, wherever the kernel lacks
  aufs, and runs on kernels that carry it;
* the rest checks, without aufs, what can be checked of the three causes of the issue
  "aufs on a kernel that has it": the mount plans (data) and the order they are performed
  in, the bookkeeping names kept out of views, diffs, changes, freezes and applied tars,
  and the pseudo-link flush as a step the driver takes before a freeze, a diff and an
  unmount; on a real layer home, through ``_DescribeOnlyAufs`` — a fake only in its
  support check (which would refuse this kernel). Nothing here mounts aufs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conformance import DriverConformance, open_driver  # noqa: E402

from csi.errors import NotSupported, OutOfRange  # noqa: E402
from csi.graphdriver.diff.whiteouts import AUFS_BOOKKEEPING, AUFS_WHITEOUTS  # noqa: E402
from csi.graphdriver.overlay import aufs as aufs_module  # noqa: E402
from csi.graphdriver.overlay import upperdelta  # noqa: E402
from csi.graphdriver.overlay.aufs import BRANCHES_PER_MOUNT, MAX_BRANCHES, AufsDriver, PlinkFlush  # noqa: E402
from csi.host import mount as mnt  # noqa: E402
from csi.host.fsinfo import kernel_has  # noqa: E402


class TestAufs(DriverConformance):
    max_depth = MAX_BRANCHES

    @pytest.fixture
    def driver(self, ext4_dir: Path) -> Iterator[AufsDriver]:
        try:
            with open_driver(AufsDriver, ext4_dir / "aufs") as drv:
                yield drv  # type: ignore[misc]
        except NotSupported as exc:
            pytest.skip(f"kernel lacks aufs: {exc}")


class _DescribeOnlyAufs(AufsDriver):
    """AufsDriver with the kernel check bypassed, to build mount descriptions here."""

    @classmethod
    def check_support(cls, home: Path, options: Mapping[str, str]) -> None:
        return None


@pytest.fixture
def aufs(ext4_dir: Path) -> Iterator[AufsDriver]:
    drv = _DescribeOnlyAufs(ext4_dir / "aufs")
    try:
        yield drv
    finally:
        drv.store.close()


def test_support_check_names_the_missing_filesystem(ext4_dir: Path) -> None:
    if kernel_has("aufs"):
        pytest.skip("this kernel has aufs")
    with pytest.raises(NotSupported, match=r"aufs not in /proc/filesystems"):
        AufsDriver(ext4_dir / "aufs")
    assert not (ext4_dir / "aufs").exists()


def _chain(drv: AufsDriver, depth: int) -> str:
    """A writable layer on top of ``depth - 1`` frozen layers; returns its id."""
    drv.create("w0")
    for i in range(depth - 1):
        drv.freeze("w0", f"f{i}")  # unmounted freeze: w0 is rebased onto each new layer
    return "w0"


def test_writable_branches_upper_first(aufs: AufsDriver) -> None:
    top = _chain(aufs, 3)
    lay = aufs.layout
    desc = aufs.describe_mount(aufs.layer(top), aufs.chain(top))
    assert (desc.fstype, desc.source, desc.cwd) == ("aufs", "none", str(lay.links))
    br = desc.options[0]
    assert br == f"br:{lay.diff(top)}=rw:{lay.short('f1')}=ro+wh:{lay.short('f0')}=ro+wh"
    assert "dio" in desc.options and "xino=/dev/shm/aufs.xino" in desc.options
    assert "ro" not in desc.options
    for short in (lay.short("f0"), lay.short("f1")):
        assert (lay.links / short).is_symlink()


def test_frozen_view_is_read_only(aufs: AufsDriver) -> None:
    _chain(aufs, 3)
    lay = aufs.layout
    desc = aufs.describe_mount(aufs.layer("f1"), aufs.chain("f1"))
    assert desc.options[0] == "ro"
    assert desc.options[1] == f"br:{lay.short('f1')}=ro+wh:{lay.short('f0')}=ro+wh"
    # without a parent too: a one-branch aufs view (a bind mount of the diff dir would
    # show aufs's bookkeeping names, issue 15 cause 1)
    single = aufs.mount_plan(aufs.layer("f0"), aufs.chain("f0"))
    assert [(m.fstype, m.source, m.options) for m in single] == [
        ("aufs", "none", ("ro", f"br:{lay.short('f0')}=ro+wh", "dio", "xino=/dev/shm/aufs.xino"))]
    assert aufs._view_plan(aufs.chain("f0")) == single  # a private view (lower_view) is the same plan


def test_layer_without_parent_has_one_branch(aufs: AufsDriver) -> None:
    aufs.create("root")
    desc = aufs.describe_mount(aufs.layer("root"), aufs.chain("root"))
    assert desc.options[0] == f"br:{aufs.layout.diff('root')}=rw"


def _branches(plan: tuple[mnt.Mount, ...]) -> list[str]:
    """Every branch a plan mounts, in the order it ends up in (appends go to the bottom)."""
    first = next(o for o in plan[0].options if o.startswith("br:"))
    found = first[len("br:"):].split(":")
    for step in plan[1:]:
        found += [o[len("append:"):] for o in step.options if o.startswith("append:")]
    return found


def test_longest_chain_mount_plan_batches_and_appends(aufs: AufsDriver) -> None:
    """Issue 15 cause 2: aufs takes about 85 option entries per mount, so a deep chain is
    a first mount of at most BRANCHES_PER_MOUNT branches plus one ``remount,append:``
    per further lower; the plan covers the whole chain the driver claims, in order."""
    top = _chain(aufs, MAX_BRANCHES)
    lay = aufs.layout
    chain = aufs.chain(top)
    plan = aufs.mount_plan(aufs.layer(top), chain)
    expected = [f"{lay.diff(top)}=rw", *(f"{lay.short(l.id)}=ro+wh" for l in chain[1:])]
    assert _branches(plan) == expected and len(expected) == MAX_BRANCHES
    assert len(plan) == 1 + MAX_BRANCHES - BRANCHES_PER_MOUNT
    first, appends = plan[0], plan[1:]
    assert first.options[0].count("=") == BRANCHES_PER_MOUNT and "remount" not in first.options
    assert "dio" in first.options and "xino=/dev/shm/aufs.xino" in first.options
    for step in plan:
        assert step.cwd == str(lay.links) and step.fstype == "aufs"
        _, data = step.flags_and_data()
        assert len(data.encode()) < 4096, "a classic mount(2) data string must fit one page"
    for step, branch in zip(appends, expected[BRANCHES_PER_MOUNT:]):
        assert step.options == ("remount", f"append:{branch}")
    # a read-only view of the deepest frozen chain stays read-only through its appends
    aufs.freeze(top, "deepest")  # a rebase would exceed the limit: the freeze copies
    view = aufs.mount_plan(aufs.layer("deepest"), aufs.chain("deepest"))
    assert len(_branches(view)) == MAX_BRANCHES and all("ro" in step.options for step in view)
    assert view[1].options[:2] == ("remount", "ro")
    assert aufs.layer(top).parent == f"f{MAX_BRANCHES - 2}"
    with pytest.raises(OutOfRange, match=str(MAX_BRANCHES)):
        aufs.create("too-deep", "deepest")
    assert not aufs.exists("too-deep") and "too-deep" not in aufs._on_disk()


def test_short_chains_mount_once(aufs: AufsDriver) -> None:
    top = _chain(aufs, BRANCHES_PER_MOUNT)
    assert len(aufs.mount_plan(aufs.layer(top), aufs.chain(top))) == 1
    aufs.freeze(top, "one-more")
    aufs.create("w1", "one-more")
    assert len(aufs.mount_plan(aufs.layer("w1"), aufs.chain("w1"))) == 2


def test_append_steps_are_remounts() -> None:
    flags, data = mnt.Mount("aufs", "none", ("remount", "ro", "append:X=ro+wh")).flags_and_data()
    assert flags & mnt.MS_REMOUNT and flags & mnt.MS_RDONLY and data == "append:X=ro+wh"


def test_plan_is_performed_in_order_and_undone_on_failure(aufs: AufsDriver, monkeypatch: pytest.MonkeyPatch) -> None:
    top = _chain(aufs, BRANCHES_PER_MOUNT + 2)
    plan = aufs.mount_plan(aufs.layer(top), aufs.chain(top))
    done: list[tuple[mnt.Mount, Path]] = []
    undone: list[Path] = []
    monkeypatch.setattr(mnt, "mount", lambda m, target: done.append((m, Path(target))))
    monkeypatch.setattr(mnt, "unmount", lambda target, **kw: undone.append(Path(target)))
    aufs._activate(aufs.layer(top), aufs.chain(top), "")
    assert done == [(m, aufs.layout.merged(top)) for m in plan] and undone == []

    def failing(m: mnt.Mount, target: Path) -> None:
        if "remount" in m.options:
            raise mnt.MountError("append", 22)
        done.append((m, Path(target)))

    done.clear()
    monkeypatch.setattr(mnt, "mount", failing)
    with pytest.raises(mnt.MountError):
        aufs._activate(aufs.layer(top), aufs.chain(top), "")
    assert done == [(plan[0], aufs.layout.merged(top))] and undone == [aufs.layout.merged(top)]


def test_whiteouts_are_native_oci_names(aufs: AufsDriver, tmp_path: Path) -> None:
    import io
    import tarfile

    aufs.create("w")
    diff = aufs.layout.diff("w")
    (diff / "kept").write_text("kept")
    (diff / ".wh.gone").write_text("")
    (diff / "dir").mkdir()
    (diff / "dir" / ".wh..wh..opq").write_text("")
    (diff / ".wh..wh.plnk").mkdir()  # aufs bookkeeping
    with tarfile.open(fileobj=aufs.diff("w"), mode="r|") as tar:
        names = [m.name.rstrip("/") for m in tar]
    assert ".wh.gone" in names and "dir/.wh..wh..opq" in names and "kept" in names
    assert not any(".wh..wh.plnk" in n for n in names)
    assert AUFS_WHITEOUTS.whiteout_target("", ".wh.gone", (diff / ".wh.gone").stat()) == "gone"
    buf = io.BytesIO()
    aufs.create("y")
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("d", "d/.wh..wh..opq"):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE if name == "d" else tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(b""))
    buf.seek(0)
    aufs.apply_diff("y", None, buf)
    assert (aufs.layout.diff("y") / "d" / ".wh..wh..opq").is_file()


def _bookkeeping(diff: Path) -> None:
    """What aufs leaves in a branch once it has been mounted (the names the issue saw)."""
    assert AUFS_BOOKKEEPING == (".wh..wh.aufs", ".wh..wh.orph", ".wh..wh.plnk")
    (diff / ".wh..wh.aufs").write_text("")
    (diff / ".wh..wh.orph").mkdir()
    (diff / ".wh..wh.plnk").mkdir()
    (diff / ".wh..wh.plnk" / "1234.5").write_text("pseudo-linked copy")
    (diff / ".wh..wh.plnk" / "sub").mkdir()
    (diff / ".wh..wh.plnk" / "sub" / "deep").write_text("")


def test_bookkeeping_never_diffed_listed_or_frozen(aufs: AufsDriver, tmp_path: Path) -> None:
    """Issue 15 cause 1 where the diff dir is read directly: the native diff, its size, the
    changes, a copying freeze and an applied tar never carry aufs's bookkeeping names."""
    import io
    import tarfile

    aufs.create("w")
    diff = aufs.layout.diff("w")
    (diff / "kept").write_text("kept")
    _bookkeeping(diff)
    with tarfile.open(fileobj=aufs.diff("w"), mode="r|") as tar:
        names = [m.name.rstrip("/") for m in tar]
    assert "kept" in names and not any(".wh..wh." in n for n in names), names
    assert aufs.diff_size("w") == len(aufs.diff("w").read())
    assert [c.path for c in aufs.changes("w")] == ["/kept"]
    tree = upperdelta.scan(diff, AUFS_WHITEOUTS)  # what a copying (mounted) freeze copies
    assert sorted(tree) == ["", "kept"]
    upperdelta.build(diff, tmp_path / "copy", upperdelta.full(tree), AUFS_WHITEOUTS)
    assert sorted(os.listdir(tmp_path / "copy")) == ["kept"]
    buf = io.BytesIO()  # a tar that tries to plant bookkeeping: ignored
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in (".wh..wh.plnk/99.1", ".wh..wh.orph/x", "ok"):
            tar.addfile(tarfile.TarInfo(name), io.BytesIO(b""))
    buf.seek(0)
    aufs.create("y")
    aufs.apply_diff("y", None, buf)
    assert sorted(os.listdir(aufs.layout.diff("y"))) == ["ok"]


class _Maint:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def begin(self, si: str) -> None:
        self.calls.append(f"begin si={si}")

    def clean(self) -> None:
        self.calls.append("clean")

    def end(self) -> None:
        self.calls.append("end")


def test_flush_copies_up_pseudo_linked_names_then_cleans(tmp_path: Path) -> None:
    """Issue 15 cause 3, the flush's own logic (as ``auplink flush``): in maintenance mode,
    touch every name of the view whose inode is pseudo-linked, clean, remove the plinks."""
    view, branch = tmp_path / "view", tmp_path / "branch"
    (view / "data").mkdir(parents=True)
    (view / "hard-a").write_text("shared")
    os.link(view / "hard-a", view / "data" / "hard-c")
    (view / "other").write_text("other")
    (view / ".wh..wh.plnk").mkdir()  # never entered
    (branch / ".wh..wh.plnk").mkdir(parents=True)
    ino = os.stat(view / "hard-a").st_ino
    plink = branch / ".wh..wh.plnk" / f"{ino}.17"
    plink.write_text("shared")
    os.link(view / "other", view / ".wh..wh.plnk" / f"{ino}")  # same name pattern, skipped
    maint = _Maint()
    flushed = aufs_module.flush_pseudo_links(view, branch, "abc123", maint)
    assert flushed == PlinkFlush(("data/hard-c", "hard-a"), (plink,))
    assert maint.calls == ["begin si=abc123", "clean", "end"]
    assert not plink.exists() and (view / "hard-a").read_text() == "shared"
    again = _Maint()
    assert aufs_module.flush_pseudo_links(view, branch, "abc123", again) == PlinkFlush((), ())
    assert again.calls == []  # nothing pseudo-linked: maintenance mode not even entered


def test_flush_is_a_step_before_freeze_diff_and_unmount(aufs: AufsDriver, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15 cause 3, the driver's side: a writable layer's pseudo-links are flushed
    before its diff dir is frozen or diffed and before its view is unmounted."""
    flushed: list[tuple[str, str]] = []
    monkeypatch.setattr(aufs_module, "mount_si", lambda target: "si-" + Path(target).parent.name)
    monkeypatch.setattr(aufs_module, "flush_pseudo_links",
                        lambda mountpoint, branch, si: flushed.append((Path(branch).parent.name, si)))
    monkeypatch.setattr(mnt, "unmount_all", lambda target: None)
    aufs.create("w")
    aufs.diff("w").close()
    aufs.changes("w")
    aufs.diff_size("w")
    assert flushed == [("w", "si-w")] * 3
    flushed.clear()
    monkeypatch.setattr(AufsDriver, "_is_active", lambda self, layer: True)
    aufs.freeze("w", "snap")  # unmounted now: settled (flushed), unmounted, renamed
    assert flushed and set(flushed) == {("w", "si-w")}
    flushed.clear()
    aufs.diff("snap").close()  # a frozen layer has no writable branch: nothing to flush
    assert flushed == []


def test_no_flush_without_an_aufs_mount(aufs: AufsDriver, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    monkeypatch.setattr(aufs_module, "flush_pseudo_links", lambda *args: calls.append(args))
    aufs.create("w")
    assert aufs_module.mount_si(aufs.layout.merged("w")) is None
    aufs.diff("w").close()
    assert calls == []
