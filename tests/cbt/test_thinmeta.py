"""Parsing the thin pool's metadata into block maps (csi.graphdriver.devicemapper.thinmeta),
on real thin_dump / thin_delta output captured in the kernel lane's guest
(tests/cbt/data, made by tests/cbt/capture_guest.py: its docstring gives the scenario)."""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from csi.errors import StrataError
from csi.graphdriver.devicemapper import thinmeta
from csi.graphdriver.driver import BlockMap

DATA = Path(__file__).with_name("data")
SCENARIO = json.loads((DATA / "scenario.json").read_text())
IDS = SCENARIO["device_ids"]
BLOCK = SCENARIO["block_bytes"]
CAPACITY = SCENARIO["capacity_bytes"]

# what the scenario wrote (block numbers), by snapshot
ALLOCATED = {"s1": {0, 5, 6, 7, 20}, "s2": {0, 5, 6, 7, 30, 31}, "s3": {0, 5, 6, 7, 20, 40}}
CHANGED = {("s1", "s2"): {6, 20, 30, 31}, ("s1", "s3"): {40}, ("s2", "s1"): {6, 20, 30, 31}}


def blocks(extents: tuple[tuple[int, int], ...]) -> set[int]:
    return {b for start, n in extents for b in range(start, start + n)}


def dump() -> io.BytesIO:
    return io.BytesIO((DATA / "dump.xml").read_bytes())


def mapping_table(device_id: int) -> dict[int, int]:
    """virtual block -> data block of one device, straight from the dump (the reference)."""
    table: dict[int, int] = {}
    device = next(d for d in ET.parse(DATA / "dump.xml").getroot() if d.get("dev_id") == str(device_id))
    for m in device:
        if m.tag == "single_mapping":
            table[int(m.get("origin_block"))] = int(m.get("data_block"))
        else:
            for i in range(int(m.get("length"))):
                table[int(m.get("origin_begin")) + i] = int(m.get("data_begin")) + i
    return table


@pytest.mark.parametrize("snap", sorted(ALLOCATED))
def test_dump_gives_the_written_blocks(snap: str) -> None:
    found = thinmeta.parse_dump(dump(), IDS[snap])
    assert found.block_sectors * 512 == BLOCK
    assert blocks(found.extents) == ALLOCATED[snap]
    assert list(found.extents) == sorted(found.extents)


@pytest.mark.parametrize("pair", sorted(CHANGED))
def test_delta_gives_the_blocks_written_or_discarded_between(pair: tuple[str, str]) -> None:
    base, target = pair
    found = thinmeta.parse_delta(io.BytesIO((DATA / f"delta-{base}-{target}.xml").read_bytes()))
    assert found.block_sectors * 512 == BLOCK
    assert blocks(found.extents) == CHANGED[pair]


@pytest.mark.parametrize("pair", sorted(CHANGED))
def test_delta_agrees_with_comparing_the_two_mappings(pair: tuple[str, str]) -> None:
    """thin_delta's answer is the definition: a block changed iff its data block differs or
    only one side maps it."""
    a, b = (mapping_table(IDS[s]) for s in pair)
    reference = {blk for blk in a.keys() | b.keys() if a.get(blk) != b.get(blk)}
    found = thinmeta.parse_delta(io.BytesIO((DATA / f"delta-{pair[0]}-{pair[1]}.xml").read_bytes()))
    assert blocks(found.extents) == reference


def test_block_map_in_bytes_cut_at_capacity() -> None:
    found = thinmeta.ThinExtents(128, ((0, 2), (10, 5), (62, 4)))
    got = thinmeta.block_map(found, BLOCK, CAPACITY)
    assert got == BlockMap(BLOCK, CAPACITY, ((0, 2 * BLOCK), (10 * BLOCK, 5 * BLOCK), (62 * BLOCK, 2 * BLOCK)))
    assert got.mapped_bytes == 9 * BLOCK
    with pytest.raises(StrataError, match="blocks of"):
        thinmeta.block_map(found, 2 * BLOCK, CAPACITY)


def test_merge_sorts_and_joins_adjacent_and_overlapping() -> None:
    assert thinmeta.merge([(5, 1), (0, 2), (2, 1), (6, 3), (7, 1), (20, 0), (30, 2)]) == ((0, 3), (5, 4), (30, 2))
    assert thinmeta.merge([]) == ()


def test_unknown_device_and_bad_xml_are_errors() -> None:
    with pytest.raises(StrataError, match="no device 99"):
        thinmeta.parse_dump(dump(), 99)
    with pytest.raises(StrataError, match="unreadable XML"):
        thinmeta.parse_delta(io.BytesIO(b"<superblock><diff left='1'"))
    with pytest.raises(StrataError, match="no <diff>"):
        thinmeta.parse_delta(io.BytesIO(b"<superblock data_block_size='128'/>"))


def test_large_dump_streams() -> None:
    """A 1 TiB device mapped every other block (8M single mappings) is not needed: 200k
    entries show the parser is linear and merges runs."""
    rows = "".join(f'<single_mapping origin_block="{i}" data_block="{i}" time="0"/>' for i in range(200_000))
    xml = f'<superblock data_block_size="128"><device dev_id="7">{rows}</device></superblock>'.encode()
    found = thinmeta.parse_dump(io.BytesIO(xml), 7)
    assert found.extents == ((0, 200_000),)
