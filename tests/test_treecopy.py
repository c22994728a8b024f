"""The tree copier (csi.host.treecopy) on this host's filesystem: a durable copy (batched
syncs within a tree) is the same tree as its source, and a copy nested in a job keeps the
job's hard links; on ext4 (no reflinks) every file's content is really copied."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from csi.host.treecopy import TreeCopier, copy_tree
from layertree import assert_same_tree, populate, set_mtimes


@pytest.mark.parametrize("durable", [False, True])
def test_copy_is_the_same_tree(tmp_path: Path, durable: bool) -> None:
    src = tmp_path / "src"
    src.mkdir()
    populate(src)
    (src / "many").mkdir()
    for i in range(50):  # enough files that the batched syncs have a batch
        (src / "many" / f"f{i}").write_bytes(os.urandom(3000 + i))
    set_mtimes(src)
    stats = copy_tree(src, tmp_path / "dst", durable=durable)
    assert_same_tree(src, tmp_path / "dst")
    assert stats.bytes > 50 * 3000


def test_one_job_keeps_hard_links_across_trees_and_entries(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "file").write_bytes(b"shared")
    os.link(src / "a" / "file", src / "linked")
    out = tmp_path / "out"
    out.mkdir()
    copier = TreeCopier(durable=True)
    copier.tree(src / "a", out / "a")
    copier.entry(src / "linked", out / "linked", os.lstat(src / "linked"))
    assert os.lstat(out / "a" / "file").st_ino == os.lstat(out / "linked").st_ino
    assert (out / "linked").read_bytes() == b"shared"
    assert copier.stats().hard_links == 1
