"""Start-up recovery, branch by branch: the state a kill -9 can leave at each step of
each call is made by hand (records written, layers made, mounts done or lost), the plugin
is restarted, and the outcome is checked. Complements the random kills of
test_csi_crash.py with every half-done case made deterministically."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from csi_harness import Harness, files_of

from csi.graphdriver.driver import CreateOpts
from csi.host import mount as mnt
from csi.ids import new_layer_id
from csi.proto import csi_pb2 as pb
from csi.services.targets import bind
from csi.state.store import PUBLISH, STAGE, Publication, RecordState, SnapshotRecord, VolumeRecord


@pytest.mark.parametrize("driver", ["vfs", "overlay", "btrfs"])
def test_half_done_work_is_rolled_back_or_finished(plugin_on: Callable[[str], Harness], driver: str) -> None:
    h = plugin_on(driver)
    kept = h.create_volume("pvc-kept")
    kept_layer = kept.volume_id.split("@")[0]
    staging, target = h.mounted(kept.volume_id, "kept")
    (target / "f").write_bytes(b"committed data")
    snap = h.snapshot("snap-kept", kept.volume_id)
    assert h.handle is not None
    plugin = h.handle.plugin
    store, driver = plugin.store, plugin.driver

    # CreateVolume killed after the layer was made, before the commit
    pending = store.add_volume(VolumeRecord(layer=new_layer_id("vol-"), name="pvc-pending", capacity=0))
    driver.create(pending.layer, None, CreateOpts())
    # clone killed after the freeze of its base, before the clone layer
    base = new_layer_id("base-")
    clone = store.add_volume(VolumeRecord(layer=new_layer_id("vol-"), name="pvc-clone", capacity=0,
                                          source_kind="volume", source_id=kept.volume_id, base_layer=base))
    driver.freeze(kept_layer, base)
    # DeleteVolume killed after forgetting, before the layer went
    doomed = h.create_volume("pvc-doomed")
    doomed_layer = doomed.volume_id.split("@")[0]
    store.set_volume(doomed_layer, state=RecordState.REMOVING)
    # CreateSnapshot killed before its commit
    half_snap = store.add_snapshot(SnapshotRecord(layer=new_layer_id("snap-"), name="snap-half",
                                                  source_layer=kept_layer))
    driver.freeze(kept_layer, half_snap.layer)
    # CreateVolume killed after its ready record, before the driver made the layer
    recorded = store.add_volume(VolumeRecord(layer=new_layer_id("vol-"), name="pvc-recorded", capacity=0,
                                             state=RecordState.READY))
    # a layer made and never recorded (killed between layer work and the record)
    orphan = new_layer_id("vol-")
    driver.create(orphan, None, CreateOpts())
    # NodeStageVolume killed after get + mount, before the commit
    stage_vol = h.create_volume("pvc-stage")
    stage_layer = stage_vol.volume_id.split("@")[0]
    half_staging = h.staging_path("half")
    half_staging.mkdir()
    pub = store.add_publication(Publication(stage_layer, STAGE, str(half_staging)))
    bind(driver.get(stage_layer), half_staging, False, ())
    # NodePublishVolume killed after the mount, before the commit
    half_target = h.target_path("half-pub")
    half_target.mkdir()
    store.add_publication(Publication(kept_layer, PUBLISH, str(half_target), source=str(staging)))
    bind(staging, half_target, False, ())
    # the committed publication's mount lost (kill -9 mid-teardown, or an admin)
    mnt.unmount(target)
    assert pub.state is RecordState.PENDING

    h.restart()
    assert h.handle is not None
    plugin = h.handle.plugin
    store, driver = plugin.store, plugin.driver
    names = {v.name for v in store.volumes()}
    assert names == {"pvc-kept", "pvc-stage"}
    assert {s.name for s in store.snapshots()} == {"snap-kept"}
    assert {l.id for l in driver.layers()} == {kept_layer, stage_layer, snap.snapshot_id.split("@")[0]}
    for gone in (pending.layer, clone.layer, base, doomed_layer, half_snap.layer, orphan, recorded.layer):
        assert driver.store.get(gone) is None, gone
    assert store.publications(stage_layer) == [] and not mnt.is_mount_point(half_staging)
    assert driver.layer(stage_layer).mounts == 0
    assert not mnt.is_mount_point(half_target) and not half_target.exists()
    assert mnt.is_mount_point(target) and files_of(target) == {"f": b"committed data"}
    assert driver.layer(kept_layer).mounts == 1
    assert driver._on_disk() == {l.id for l in driver.store.all()}  # noqa: SLF001
    h.release(kept.volume_id, staging, target)
    h.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=kept.volume_id))
