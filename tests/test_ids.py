"""Layer ID validation: the only gate between caller-supplied IDs and the filesystem."""

from __future__ import annotations

import pytest

from csi.errors import InvalidArgument
from csi.ids import LAYER_ID_MAX, check_layer_id, is_layer_id, new_layer_id

GOOD = ["a", "0", "pvc-1234", "snap_01", "a" * LAYER_ID_MAX, "0-_", "x9"]
BAD = [
    "", "../x", "..", ".", "/etc", "a/b", "a\x00b", "a" * (LAYER_ID_MAX + 1), "Upper", "a.b", " a", "a ",
    "-leading-dash", "_leading", "a\nb", "ä", "a\\b", None, 7, b"abc", ["a"],
]


@pytest.mark.parametrize("value", GOOD)
def test_accepts_well_formed(value: str) -> None:
    assert is_layer_id(value)
    assert check_layer_id(value) == value


@pytest.mark.parametrize("value", BAD)
def test_rejects_malformed(value: object) -> None:
    assert not is_layer_id(value)
    with pytest.raises(InvalidArgument) as info:
        check_layer_id(value, "parent layer id")
    message = str(info.value)
    assert message.startswith("parent layer id ") and "[a-z0-9_-]" in message
    assert len(message) < 300  # a huge ID is not echoed in full


def test_new_ids_are_valid_and_distinct() -> None:
    ids = {new_layer_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(is_layer_id(i) and len(i) == 32 for i in ids)
    assert new_layer_id("snap-").startswith("snap-")
    with pytest.raises(InvalidArgument):
        new_layer_id("../")
