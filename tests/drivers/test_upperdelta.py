"""upperdelta's planning on made-up trees: the cases a layer on top of the last freeze
cannot express (a full copy follows), and hard links copied all or nothing. The real
kernel cases (overlay over ext4/btrfs) are in test_overlay.py and the state machine."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from csi.graphdriver.overlay.upperdelta import Entry, NotIncremental, Tree, lookup, plan

DIR, REG, CHR = stat.S_IFDIR, stat.S_IFREG, stat.S_IFCHR


def _e(fmt: int, ino: int, *, ctime: int = 1, opaque: bool = False, nlink: int = 1, trusted: bool = True,
       rdev: int = 0) -> Entry:
    return Entry(fmt, ino, ctime, ctime, fmt | 0o644, 0, nlink, 0, 0, rdev, opaque, trusted)


ROOT = _e(DIR, 1)


def _nothing_below(rel: str) -> os.stat_result | None:
    return None


def _below(present: dict[str, int]):  # type: ignore[no-untyped-def]
    return lambda rel: os.stat_result((present[rel] | 0o755, 0, 0, 1, 0, 0, 0, 0, 0, 0)) if rel in present else None


def test_unchanged_entries_are_skipped_and_changes_listed() -> None:
    old: Tree = {"": ROOT, "a": _e(REG, 2), "d": _e(DIR, 3), "d/b": _e(REG, 4), "gone": _e(REG, 5)}
    new: Tree = {"": ROOT, "a": _e(REG, 2), "d": _e(DIR, 3), "d/b": _e(REG, 4, ctime=2), "n": _e(REG, 6)}
    delta = plan(old, new, _nothing_below)
    assert delta.copies == ["d/b", "n"] and delta.whiteouts == ["gone"] and delta.dirs == {"d"}


def test_untrusted_fingerprints_are_copied_again() -> None:
    old: Tree = {"": ROOT, "a": _e(REG, 2, trusted=False)}
    assert plan(old, {"": ROOT, "a": _e(REG, 2)}, _nothing_below).copies == ["a"]


def test_a_deletion_that_uncovers_the_parent_layer_is_not_expressible() -> None:
    old: Tree = {"": ROOT, "f": _e(REG, 2)}
    with pytest.raises(NotIncremental):
        plan(old, {"": ROOT}, _below({"f": REG}))
    opaque_old: Tree = {"": ROOT, "o": _e(DIR, 3, opaque=True), "o/f": _e(REG, 2)}
    opaque_new: Tree = {"": ROOT, "o": _e(DIR, 3, opaque=True)}
    # under an opaque dir the parent layer shows nothing: a whiteout is exact
    assert plan(opaque_old, opaque_new, _below({"o": DIR, "o/f": REG})).whiteouts == ["o/f"]


def test_directories_merging_where_the_last_freeze_hid_the_parent_are_not_expressible() -> None:
    old: Tree = {"": ROOT, "x": _e(CHR, 2)}  # a whiteout
    new: Tree = {"": ROOT, "x": _e(DIR, 3)}  # a plain (non-opaque) directory
    with pytest.raises(NotIncremental):
        plan(old, new, _below({"x": DIR}))
    assert plan(old, new, _nothing_below).copies == ["x"]
    was_opaque: Tree = {"": ROOT, "x": _e(DIR, 2, opaque=True)}
    with pytest.raises(NotIncremental):
        plan(was_opaque, new, _below({"x": DIR}))
    became_opaque = {"": ROOT, "x": _e(DIR, 3, opaque=True)}
    assert plan({"": ROOT, "x": _e(DIR, 2)}, became_opaque, _below({"x": DIR})).copies == ["x"]


def test_hard_links_are_copied_all_or_nothing() -> None:
    old: Tree = {"": ROOT, "a": _e(REG, 2, nlink=2), "b": _e(REG, 2, nlink=2)}
    new = dict(old, c=_e(REG, 2, nlink=2))  # a third name, same fingerprint (not possible for
    # the kernel, whose link() sets ctime, but the plan must not split the inode anyway)
    assert sorted(plan(old, new, _nothing_below).copies) == ["a", "b", "c"]
    assert plan(old, dict(old), _nothing_below).copies == []


def test_lookup_never_follows_symlinks(tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "f").write_text("f")
    view = tmp_path / "view"
    view.mkdir()
    os.symlink(tmp_path / "outside", view / "link")
    os.mknod(view / "wh", 0o600 | stat.S_IFCHR, 0)
    assert lookup(view, "link/f") is None and lookup(view, "wh") is None
    assert lookup(view, "link") is not None and lookup(view, "missing/x") is None
