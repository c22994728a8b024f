"""Start-up recovery: bring the state store, the layered driver and the mounts in line.

Contract: :func:`recover` runs once per start, from the server's start-up code
(:func:`csi.services.server.start_server`) before the socket is served and before the
plugin reports ready, after the driver's own reconciliation (which finishes or rolls back
half-done layer work). It works from the records alone, with its own undo — not the Node
service's, which undoes a call that failed while it ran — and reaches the driver only
through its contract (:class:`csi.graphdriver.driver.Driver`: ``references`` /
``set_references`` / ``release``, never the driver's metastore). Steps:

1. Publications that are not ``ready`` (a stage/publish interrupted, or a teardown
   interrupted) are undone: unmount, remove the target directory, forget the row.
   kubelet retries what it did not see succeed.
2. Volume group snapshots that are not ``ready`` (a create or a delete interrupted) are
   removed whole: the member layers the row names, their rows, the group row — all
   members or none. Then volumes and snapshots still ``pending`` (never acknowledged) are rolled back — their
   layers (and a clone's base layer) removed — and ``removing`` ones are finished.
   Inline volumes whose publication is gone are removed. A ``ready`` volume whose layer
   does not exist is forgotten: CreateVolume writes its record while the driver makes the
   layer (the two syncs run at once) and acknowledges after both, so such a record is a
   create a crash cut short.
3. Layers with strata's prefixes (``vol-``, ``snap-``, ``base-``) that no record knows of
   are removed (a crash between layer work and commit).
4. Pulls of content sources (``transfers`` rows: a CreateVolume from another node or a
   backup) died with the process: their rows are rolled back. Layers they imported whole
   are verified ``oci-<ChainID>`` layers and stay (the node's cache: the repeated
   CreateVolume resumes from the first missing one); a half-imported layer is an
   ``ocitmp-`` layer, removed by the start-up sweep (:func:`csi.backup.sweep_temporaries`).
   Backup uploads that were running are marked ``failed``; the repeated CreateSnapshot,
   which carries the registry credentials, starts them again.
5. Each layer's mount reference count is set to the number of ``ready`` stagings of it
   (plus its inline publication), and every ``ready`` staging and publication whose
   mount is gone is mounted again. A block volume's staging mounts nothing (its
   reference keeps the device active); its publication binds the device node again.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

from csi.graphdriver.driver import Driver
from csi.host import mount as mnt
from csi.services.targets import bind, prepare_file, remove_target
from csi.services.volume_ids import CLONE_BASE_PREFIX, SNAPSHOT_PREFIX, VOLUME_PREFIX
from csi.state.store import BACKUP_FAILED, BACKUP_UPLOADING, GroupRecord, PUBLISH, Publication, RecordState, STAGE, StateStore

log = logging.getLogger("strata.recovery")
PREFIXES = (VOLUME_PREFIX, SNAPSHOT_PREFIX, CLONE_BASE_PREFIX)


def roll_back_group(store: StateStore, driver: Driver, group: GroupRecord) -> None:
    """Remove a volume group snapshot whole: its member layers (deferred while restored
    volumes use them), the member rows, the group row. For a create that failed, Delete, and
    recovery of a ``pending`` / ``removing`` group."""
    for layer in group.members:
        driver.release(layer)
    with store.transaction():
        for layer in group.members:
            store.delete_snapshot(layer)
        store.delete_group(group.group_id)


def recover(store: StateStore, driver: Driver) -> None:
    # Each list is read once and kept in step with what recovery itself removes (nothing else
    # writes while it runs): at 10,000s of records a full read costs ~0.1 s, and a per-layer
    # driver call more than that. The layers are read again only after a step removed some.
    volumes = store.volumes()
    ephemeral = {v.layer: v for v in volumes if v.ephemeral}

    # 1. interrupted publications
    for pub in store.publications():
        inline = ephemeral.get(pub.layer)
        if pub.state is RecordState.READY and (inline is None or inline.state is RecordState.READY):
            continue
        log.info("recovery: undoing interrupted %s of %s at %s", pub.kind, pub.layer, pub.path)
        mnt.unmount_all(pub.path)
        if pub.kind == PUBLISH:
            remove_target(pub.path)
        store.delete_publication(pub)

    # 2. interrupted creates and deletes (groups first: their members are snapshots)
    for group in store.groups():
        if group.state is not RecordState.READY:
            log.info("recovery: removing unfinished group snapshot %s (%s, %d member(s))", group.group_id,
                     group.name, len(group.members))
            roll_back_group(store, driver, group)
    layers = driver.layers()
    layers_changed = False
    present = {layer.id for layer in layers}
    publications: dict[str, list[Publication]] = {}
    for pub in store.publications():
        publications.setdefault(pub.layer, []).append(pub)
    forgotten: set[str] = set()
    for volume in volumes:
        published = publications.get(volume.layer, [])
        if volume.state is RecordState.READY and not volume.ephemeral and volume.layer not in present:
            # CreateVolume writes the record while the driver makes the layer (both synced at once,
            # acknowledged after both): a crash between leaves a record of an unacknowledged volume
            log.warning("recovery: volume %s (%s) has no layer: its create was cut short; forgetting it",
                        volume.layer, volume.name)
            store.delete_volume(volume.layer)
            forgotten.add(volume.layer)
            continue
        if volume.state is RecordState.READY and not (volume.ephemeral and not published):
            continue
        log.info("recovery: %s volume %s (%s)", "rolling back" if volume.state is RecordState.PENDING
                 else "finishing removal of", volume.layer, volume.name)
        for layer in (volume.layer, volume.base_layer):
            if layer is not None:
                driver.release(layer)
        layers_changed = True
        store.delete_volume(volume.layer)
        forgotten.add(volume.layer)
    snapshots = []
    for snapshot in store.snapshots():
        if snapshot.state is not RecordState.READY:
            log.info("recovery: removing unfinished snapshot %s (%s)", snapshot.layer, snapshot.name)
            driver.release(snapshot.layer)
            layers_changed = True
            store.delete_snapshot(snapshot.layer)
        else:
            snapshots.append(snapshot)

    # 3. layers no record knows of
    known = {v.layer for v in volumes if v.layer not in forgotten} | {s.layer for s in snapshots}
    if layers_changed:
        layers, layers_changed = driver.layers(), False
    for layer in layers:
        if layer.id.startswith(PREFIXES) and layer.id not in known:
            log.info("recovery: removing orphan layer %s", layer.id)
            driver.release(layer.id)
            layers_changed = True

    # 4. pulls and uploads the process was running
    for transfer in store.transfers():
        log.info("recovery: rolling back the pull of %s for volume %r (started %.0f s ago); a retried "
                 "CreateVolume resumes it", transfer.source_id, transfer.name, time.time() - transfer.started)
        store.delete_transfer(transfer.name)
    for snapshot in snapshots:
        if snapshot.backup_state == BACKUP_UPLOADING:
            log.info("recovery: the upload of snapshot %s to %s was interrupted; the next CreateSnapshot "
                     "starts it again", snapshot.layer, snapshot.backup_target)
            store.set_snapshot_backup(snapshot.layer, backup_state=BACKUP_FAILED)

    # 5. reference counts and mounts
    pubs = store.publications()
    wanted = Counter(p.layer for p in pubs if p.kind == STAGE or p.layer in ephemeral)
    if layers_changed:
        layers = driver.layers()
    for layer in layers:
        if wanted[layer.id] or layer.mounts:  # neither held nor wanted: nothing to set
            driver.set_references(layer.id, wanted[layer.id])
    block_layers = {layer.id for layer in layers if layer.block}
    for pub in sorted(pubs, key=lambda p: p.kind != STAGE):  # stagings first: publications bind from them
        if mnt.is_mount_point(pub.path) or (pub.layer in block_layers and pub.kind == STAGE):
            continue
        log.info("recovery: re-mounting %s of %s at %s", pub.kind, pub.layer, pub.path)
        if pub.layer in block_layers:
            prepare_file(pub.path, "block volume target")
            source = driver.block_device(pub.layer)
        elif pub.kind == STAGE or not pub.source:
            source = driver.get(pub.layer)
            driver.put(pub.layer)  # the count was set above; this get only asked for the path
        else:
            source = pub.source
        bind(source, pub.path, pub.readonly, pub.flags)
