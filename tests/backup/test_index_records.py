"""The export index's records: malformed artifact records are dropped (also under ``python -O``,
where ``assert`` is stripped), and ``forget_missing`` drops the records of deleted layers."""

from __future__ import annotations

import json

import pytest

from csi.backup.index import ArtifactRecord, ExportIndex, ExportRecord
from csi.backup.media import LAYER_TAR, Descriptor, LayerFacts

D1, D2 = "sha256:" + "a" * 64, "sha256:" + "b" * 64
LOCATION = "oci-layout:/backups/vol"


def _artifact(layer_id: str = "snap-1") -> ArtifactRecord:
    return ArtifactRecord(layer_id, 12.5, LOCATION, LAYER_TAR,
                          (LayerFacts(layer_id, D1, Descriptor(LAYER_TAR, D1, 10)),), 0, D2)


def _good() -> dict:
    return _artifact().to_json()


def _with(**changes: object) -> dict:
    return {**_good(), **changes}


def _without(key: str) -> dict:
    raw = _good()
    del raw[key]
    return raw


def _layer_with(**changes: object) -> dict:
    raw = _good()
    raw["layers"] = [{**raw["layers"][0], **changes}]
    return raw


def test_a_well_formed_record_round_trips() -> None:
    assert ArtifactRecord.from_json(_good()) == _artifact()


@pytest.mark.parametrize("raw", [
    None, "snap-1", 7, [], [_good()],  # not an object at all
    _without("layers"), _without("layer_id"), _without("created"), _without("location"),
    _without("media_type"), _without("increments"),
    _with(layers=[]), _with(layers="abc"), _with(layers={"source": "x"}), _with(layers=None),
    _with(layers=["not-an-object"]), _with(increments=-1), _with(increments="many"), _with(created="yesterday"),
    _layer_with(digest="sha256:short"), _layer_with(diff_id="md5:" + "a" * 32), _layer_with(size="big"),
    _with(layers=[{"source": "snap-1"}]),
])
def test_a_malformed_record_is_dropped(raw: object) -> None:
    assert ArtifactRecord.from_json(raw) is None


def test_malformed_artifacts_in_the_file_are_skipped(tmp_path) -> None:
    path = tmp_path / "backup-index.json"
    good = _good()
    path.write_text(json.dumps({"version": 1, "records": {}, "artifacts": {
        "a": good, "b": ["not", "a", "record"], "c": "text", "d": _with(layers=[]), "e": None}}))
    assert ExportIndex(path).artifacts(LOCATION, LAYER_TAR) == [_artifact()]


class _Layers:
    """The one driver call ``forget_missing`` makes."""

    def __init__(self, *ids: str) -> None:
        self.ids = set(ids)

    def exists(self, layer_id: str) -> bool:
        return layer_id in self.ids


def test_forget_missing_drops_the_records_of_deleted_layers(tmp_path) -> None:
    index = ExportIndex(tmp_path / "backup-index.json")
    for layer in ("snap-kept", "snap-gone"):
        index.record(ExportRecord(layer, None, 12.5, LAYER_TAR, D1, D1, 10, (LOCATION,)))
        index.record_artifact(_artifact(layer))
    assert index.forget_missing(_Layers("snap-kept")) == 2  # one diff record, one artifact record
    assert index.lookup("snap-kept", None, LAYER_TAR, 12.5) is not None
    assert index.lookup("snap-gone", None, LAYER_TAR, 12.5) is None
    assert [r.layer_id for r in index.artifacts(LOCATION, LAYER_TAR)] == ["snap-kept"]
    assert index.forget_missing(_Layers("snap-kept")) == 0  # nothing more to drop


def test_forget_missing_drops_malformed_records(tmp_path) -> None:
    path = tmp_path / "backup-index.json"
    path.write_text(json.dumps({"version": 1, "records": {"x": "text", "y": None}, "artifacts": {"z": 3}}))
    assert ExportIndex(path).forget_missing(_Layers("snap-1")) == 3
    assert json.loads(path.read_text())["records"] == {}


def test_a_diff_record_with_a_malformed_digest_is_ignored(tmp_path) -> None:
    index = ExportIndex(tmp_path / "backup-index.json")
    index.record(ExportRecord("snap-1", None, 12.5, LAYER_TAR, "sha256:short", D1, 10, (LOCATION,)))
    assert index.lookup("snap-1", None, LAYER_TAR, 12.5) is None
