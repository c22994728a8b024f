"""devicemapper thin-pool driver: each layer is a thin device carrying its own filesystem.

Pool: either the operator's (``dm.thinpooldev=/dev/mapper/NAME``, an existing thin-pool
or LVM thin pool, used exclusively by this home) or, for development only, one built on
two sparse files in the home (``dm.loopback=true``, Docker's old "loop-lvm"; a loud
warning is logged and shown in ``status()``). Without either the driver is unavailable:
it never builds a pool unasked.

Options: ``dm.fs`` (ext4 | xfs, default ext4), ``dm.basesize`` (size of a layer created
without one, default 10G), ``dm.min_free_space`` (percent of pool data and metadata that
must stay free for a new layer, default 10), ``dm.loopdatasize`` / ``dm.loopmetadatasize``
(sparse file sizes, default 100G / 2G), ``dm.blocksize`` (pool block, default 64K).

Layers: a writable layer is ``create_thin`` + mkfs (or ``create_snap`` of its frozen
parent, grown when asked for more); ``freeze`` is ``create_snap`` of the writable layer
(suspending it first when it is active, which flushes and freezes its filesystem).
``get`` activates the thin device and mounts it (frozen ones read-only); ``put`` unmounts
and deactivates. Size = thin device size; ``resize`` grows the table, then the filesystem.

Block layers (``supports_block``; CSI volumeMode Block): ``CreateOpts(block=True)`` makes a
thin device with no filesystem (unwritten thin blocks read as zeros); ``get_block``
activates it without mounting anything and returns its node (``/dev/dm-N``), ``put``
deactivates it; ``resize`` grows only the table. Snapshots and clones of block layers
are thin snapshots like the rest; before snapshotting an active block origin its page
cache is flushed (``fsync`` on the device), then it is suspended as any other origin.

Block metadata (changed-block tracking): ``allocated_blocks`` / ``changed_blocks`` of block
layers come from the pool's own metadata through a metadata snapshot and
thin-provisioning-tools (``thin_dump`` / ``thin_delta``, :mod:`.thinmeta`), in the pool's
block size; never from the data. Offered (``supports_block_metadata``) when both tools are
installed. A base larger than the layer (a base taken after it) is FailedPrecondition.

On-disk layout::

    <home>/layers.db          records; extra = {"device_id": N, "sectors": S}
    <home>/pool.json          {"pool": name, "transaction_id": T, "next_device_id": N}
    <home>/loop/data|metadata sparse files (loop-lvm mode only)
    <home>/mnt/<layer-id>/    one per layer (its presence marker); the mount point when active

Crash safety: the layer record (state ``creating``/``removing``, base machinery) is the
intent. A device id is reserved in ``pool.json`` and written into the record *before*
the pool message that creates it, so a rollback always knows what to delete; deletes
tolerate ids the pool never got. Every pool change is followed by
``set_transaction_id T T+1`` and then ``pool.json`` (rename-into-place + fsync); at
start-up a pool one transaction ahead is adopted (crash between the two), any other
mismatch means the pool is not this home's and start-up stops.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from csi.host import mount as mnt
from csi.errors import (
    FailedPrecondition,
    InvalidArgument,
    OutOfRange,
    PrerequisitesMissing,
    ResourceExhausted,
    StrataError,
)
from csi.graphdriver.devicemapper import ioctl as dm
from csi.graphdriver.devicemapper import thinmeta
from csi.graphdriver.driver import BlockMap, Capacity, Layer, Reconciliation
from csi.graphdriver.layered import LayerDriver
from csi.host.fsinfo import fsync_path, parse_size
from csi.host.atomicfile import write_atomic

log = logging.getLogger(__name__)

LOOP_WARNING = ("devicemapper runs on sparse loop files (dm.loopback=true): for development only, "
                "never production; give a real thin pool with dm.thinpooldev")
FILESYSTEMS = ("ext4", "xfs")
XFS_MIN_BYTES = 300 << 20  # mkfs.xfs refuses smaller filesystems



@dataclass(frozen=True)
class DmConfig:
    fs: str
    base_bytes: int
    min_free_percent: int
    pool_device: str | None  # operator's pool (dm.thinpooldev) or None for loop-lvm
    loop_data_bytes: int
    loop_metadata_bytes: int
    block_bytes: int

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> DmConfig:
        known = {"dm.fs", "dm.basesize", "dm.min_free_space", "dm.thinpooldev", "dm.loopback",
                 "dm.loopdatasize", "dm.loopmetadatasize", "dm.blocksize"}
        unknown = sorted(k for k in options if k.startswith("dm.") and k not in known)
        if unknown:
            raise InvalidArgument(f"unknown devicemapper option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        fs = options.get("dm.fs", "ext4")
        if fs not in FILESYSTEMS:
            raise InvalidArgument(f"dm.fs={fs!r}: choose one of {', '.join(FILESYSTEMS)}")
        pct = options.get("dm.min_free_space", "10").rstrip("%")
        if not pct.isdigit() or int(pct) > 99:
            raise InvalidArgument(f"dm.min_free_space={pct!r}: a percentage 0-99")
        pool = options.get("dm.thinpooldev") or None
        loop = options.get("dm.loopback", "false").lower() in ("1", "true", "yes")
        if pool is None and not loop:
            raise PrerequisitesMissing("no thin pool configured: set dm.thinpooldev=/dev/mapper/POOL "
                                       "(or dm.loopback=true for development)")
        base = parse_size(options.get("dm.basesize", "10G"), "dm.basesize")
        if fs == "xfs" and base < XFS_MIN_BYTES:
            raise InvalidArgument(f"dm.basesize {base} is below XFS's minimum of {XFS_MIN_BYTES} bytes")
        block = parse_size(options.get("dm.blocksize", "64K"), "dm.blocksize")
        if block % (64 << 10) or block > (1 << 30):
            raise InvalidArgument("dm.blocksize must be a multiple of 64K up to 1G")
        return cls(
            fs=fs,
            base_bytes=base,
            min_free_percent=int(pct),
            pool_device=pool,
            loop_data_bytes=parse_size(options.get("dm.loopdatasize", "100G"), "dm.loopdatasize"),
            loop_metadata_bytes=parse_size(options.get("dm.loopmetadatasize", "2G"), "dm.loopmetadatasize"),
            block_bytes=block,
        )


@dataclass(frozen=True)
class PoolRecord:
    """``pool.json``: which pool this home owns and its persisted counters."""

    pool: str
    transaction_id: int
    next_device_id: int


class DevmapperDriver(LayerDriver):
    name = "devicemapper"
    supports_block = True
    # Not yet (would be True: each volume has its own filesystem on its own thin device, and
    # create_snap is taken beneath it). With it, the group's FIFREEZE is followed by
    # ``_snapshot``'s DM_DEV_SUSPEND, whose lockfs freeze_bdev -> freeze_super finds the
    # superblock already frozen: EBUSY (kernel lane, check_dm_groups). Needs the suspend
    # without lockfs (DM_SKIP_LOCKFS_FLAG) while the group holds the freeze; until then the
    # members' writers are held (held_writers), and dm's own suspend freezes each filesystem.
    snapshot_below_filesystem = False

    @classmethod
    def check_support(cls, home: Path, options: Mapping[str, str]) -> None:
        dm.probe()
        cfg = DmConfig.from_options(options)
        for tool in (f"mkfs.{cfg.fs}", "resize2fs" if cfg.fs == "ext4" else "xfs_growfs"):
            if shutil.which(tool) is None:
                raise PrerequisitesMissing(f"{tool} not installed (e2fsprogs / xfsprogs)")
        if cfg.pool_device is None and shutil.which("losetup") is None:
            raise PrerequisitesMissing("losetup not installed (util-linux)")

    # ------------------------------------------------------------------ pool set-up

    def _setup(self) -> None:
        self.cfg = DmConfig.from_options(self.options)
        self._pool_lock = threading.RLock()  # one pool transaction at a time
        self._metasnap_lock = threading.Lock()  # one holder of the pool's metadata snapshot
        self.supports_block_metadata = not thinmeta.missing_tools()
        self._prefix = "strata-" + hashlib.sha256(str(self.home.resolve()).encode()).hexdigest()[:10]
        (self.home / "mnt").mkdir(exist_ok=True)
        if self.cfg.pool_device is None:
            log.warning(LOOP_WARNING)
            self.pool = self._loop_pool()
        else:
            self.pool = Path(self.cfg.pool_device).name
            if not dm.exists(self.pool):
                raise PrerequisitesMissing(f"dm.thinpooldev {self.cfg.pool_device}: no such device-mapper device")
        for name, suspended in dm.list_devices(self._prefix + "-").items():
            if suspended:  # killed between suspend and resume (snapshot of an active origin)
                log.warning("resuming %s, left suspended by an interrupted snapshot", name)
                dm.resume(name)
        self.block_sectors = dm.pool_block_sectors(self.pool)
        self._reconcile_transaction()
        if thinmeta.release_leftover(self.pool):
            log.warning("released the metadata snapshot of thin pool %s, left held by an interrupted "
                        "changed-block query", self.pool)

    def reconcile(self, dry_run: bool = False) -> Reconciliation:
        """Base reconciliation, then deactivate thin devices nothing holds (crash leftovers)."""
        report = super().reconcile(dry_run)
        if dry_run:
            return report
        held = {self._dev_name(l.id) for l in self.store.all() if l.mounts > 0}
        for name in dm.list_devices(self._prefix + "-"):
            if name != self.pool and name not in held:
                found = dm.info(name)
                sources = {str(dm.mapper_path(name))} | ({str(found.path)} if found else set())
                for mp in mnt.mount_points():
                    if mp.source in sources:
                        mnt.unmount(mp.target, detach=True)
                dm.remove(name)
        return report

    def _loop_pool(self) -> str:
        loopdir = self.home / "loop"
        loopdir.mkdir(exist_ok=True)
        data, meta = loopdir / "data", loopdir / "metadata"
        for path, size in ((data, self.cfg.loop_data_bytes), (meta, self.cfg.loop_metadata_bytes)):
            if not path.exists():
                tmp = path.with_suffix(".new")
                with open(tmp, "wb") as f:
                    f.truncate(size)  # sparse and zeroed: a fresh pool's metadata must start zeroed
                    os.fsync(f.fileno())
                tmp.rename(path)
        name = f"{self._prefix}.pool"  # "." never occurs in a layer id
        if not dm.exists(name):
            data_dev, meta_dev = dm.attach_loop(data), dm.attach_loop(meta)
            sectors = data.stat().st_size // dm.SECTOR
            block = self.cfg.block_bytes // dm.SECTOR
            sectors -= sectors % block
            low_water_blocks = max(1, sectors // block // 100)
            dm.create(name, "thin-pool", sectors, f"{meta_dev} {data_dev} {block} {low_water_blocks}")
        return name

    def release_pool(self) -> None:
        """Deactivate every layer and, in loop-lvm mode, the pool and its loop devices.

        The data stays in the files; a new driver on the same home brings it all back."""
        self.cleanup()
        for layer in self.store.all():
            dm.remove(self._dev_name(layer.id))
        if self.cfg.pool_device is None:
            dm.remove(self.pool)
            for f in ("data", "metadata"):
                dm.detach_loop(self.home / "loop" / f)
        self.store.close()

    def _read_record(self) -> PoolRecord | None:
        path = self.home / "pool.json"
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        return PoolRecord(raw["pool"], int(raw["transaction_id"]), int(raw["next_device_id"]))

    def _write_record(self, rec: PoolRecord) -> None:
        write_atomic(self.home / "pool.json", json.dumps(rec.__dict__))

    def _reconcile_transaction(self) -> None:
        pool_tid = dm.pool_status(self.pool).transaction_id
        rec = self._read_record()
        if rec is None:
            if self.cfg.pool_device is not None and pool_tid != 0:
                raise StrataError(f"thin pool {self.pool} is in use (transaction id {pool_tid}) but this home "
                                  "has no record of it: give strata a pool of its own")
            rec = PoolRecord(self.pool, pool_tid, 1)
        elif rec.pool != self.pool:
            raise StrataError(f"{self.home} belongs to thin pool {rec.pool}, not {self.pool}")
        elif pool_tid == rec.transaction_id + 1:
            log.info("thin pool %s is one transaction ahead (crash before it was recorded): adopting %d",
                     self.pool, pool_tid)
            rec = PoolRecord(rec.pool, pool_tid, rec.next_device_id)
        elif pool_tid != rec.transaction_id:
            raise StrataError(f"thin pool {self.pool} has transaction id {pool_tid}, this home recorded "
                              f"{rec.transaction_id}: the pool was changed by something else")
        self._write_record(rec)
        self._record = rec

    def _commit_transaction(self) -> None:
        rec = self._record
        dm.message(self.pool, f"set_transaction_id {rec.transaction_id} {rec.transaction_id + 1}")
        self._record = PoolRecord(rec.pool, rec.transaction_id + 1, rec.next_device_id)
        self._write_record(self._record)

    def _reserve_device_id(self, layer: Layer) -> int:
        """Persist the next free id, then write it into the layer's record."""
        with self._pool_lock:
            rec = self._record
            device_id = rec.next_device_id
            if device_id > dm.MAX_DEVICE_ID:
                raise ResourceExhausted(f"thin pool {self.pool}: device ids exhausted")
            self._record = PoolRecord(rec.pool, rec.transaction_id, device_id + 1)
            self._write_record(self._record)
        self.store.update(layer.id, extra={**layer.extra, "device_id": device_id})
        return device_id

    def _pool_message(self, layer: Layer, make: str) -> tuple[Layer, int]:
        """Run ``make`` (``create_thin {id}`` / ``create_snap {id} N``) with a fresh id,
        skipping ids the pool already holds. Returns the updated record and the id."""
        for _ in range(64):
            with self._pool_lock:
                device_id = self._reserve_device_id(layer)
                try:
                    dm.message(self.pool, make.format(id=device_id))
                except dm.DeviceIdTaken:
                    log.warning("thin pool %s already has device id %d; skipping it", self.pool, device_id)
                    continue
                self._commit_transaction()
            return self.store.require(layer.id), device_id
        raise StrataError(f"thin pool {self.pool}: no free device id after 64 tries")

    # ------------------------------------------------------------------ helpers

    def _dev_name(self, layer_id: str) -> str:
        name = f"{self._prefix}-{layer_id}"
        if len(name) > 120:
            name = f"{self._prefix}-h{hashlib.sha256(layer_id.encode()).hexdigest()[:40]}"
        return name

    def _thin_params(self, device_id: int) -> str:
        pool = dm.info(self.pool)
        if pool is None:
            raise dm.DmError(f"thin pool {self.pool} is gone")
        return f"{pool.numbers} {device_id}"

    def _sectors_for(self, size_bytes: int) -> int:
        block = self.block_sectors
        return -(-size_bytes // dm.SECTOR // block) * block if size_bytes else block

    def _ensure_device(self, layer: Layer) -> Path:
        name = self._dev_name(layer.id)
        found = dm.info(name)
        if found is None:
            found = dm.create(name, "thin", layer.extra["sectors"], self._thin_params(layer.extra["device_id"]))
        return found.path

    def _mount_options(self, readonly: bool) -> tuple[str, ...]:
        opts = ("ro",) if readonly else ()
        return opts + (("nouuid",) if self.cfg.fs == "xfs" else ())

    def _check_free(self, what: str) -> None:
        st = dm.pool_status(self.pool)
        pct = self.cfg.min_free_percent
        if st.mode not in ("rw", ""):
            raise ResourceExhausted(f"thin pool {self.pool} is {st.mode}: refusing {what}")
        if st.free_data_blocks * 100 < st.total_data_blocks * pct:
            raise ResourceExhausted(f"thin pool {self.pool} has {st.free_data_blocks} of {st.total_data_blocks} "
                                    f"data blocks free, below dm.min_free_space={pct}%: refusing {what}")
        free_meta = st.total_metadata_blocks - st.used_metadata_blocks
        if free_meta * 100 < st.total_metadata_blocks * pct:
            raise ResourceExhausted(f"thin pool {self.pool} metadata is {st.used_metadata_blocks}/"
                                    f"{st.total_metadata_blocks} used, below dm.min_free_space={pct}%: refusing {what}")

    def _snapshot(self, layer: Layer, origin: Layer) -> tuple[Layer, int]:
        """``create_snap`` of ``origin``, suspending it while it is active."""
        origin_name = self._dev_name(origin.id)
        active = dm.exists(origin_name)
        if active and origin.block:
            # the kernel's /dev/dm-N node (no symlink): writes back the buffered writes of the device's users
            fsync_path(dm.device_path(origin_name))
        if active:
            dm.suspend(origin_name)
        try:
            return self._pool_message(layer, f"create_snap {{id}} {origin.extra['device_id']}")
        finally:
            if active:
                dm.resume(origin_name)

    def _grow_fs(self, layer: Layer) -> None:
        """Grow the filesystem to the device size (mounting it for the time if needed)."""
        dev = self._ensure_device(layer)
        target = self._path(layer)
        mounted = mnt.is_mount_point(target)
        if not mounted:
            target.mkdir(exist_ok=True)
            mnt.mount(mnt.Mount(self.cfg.fs, str(dev), self._mount_options(False)), target)
        try:
            cmd = ["resize2fs", str(dev)] if self.cfg.fs == "ext4" else ["xfs_growfs", str(target)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise StrataError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
        finally:
            if not mounted:
                mnt.unmount(target)

    # ------------------------------------------------------------------ primitives

    def _make(self, layer: Layer, parent: Layer | None) -> None:
        want = layer.size_bytes
        if parent is not None:
            parent_bytes = parent.extra["sectors"] * dm.SECTOR
            if want is not None and want < parent_bytes:
                raise InvalidArgument(f"size {want} is smaller than parent layer {parent.id}'s {parent_bytes} bytes")
            sectors = self._sectors_for(want) if want is not None else parent.extra["sectors"]
        else:
            sectors = self._sectors_for(want if want is not None else self.cfg.base_bytes)
            if self.cfg.fs == "xfs" and sectors * dm.SECTOR < XFS_MIN_BYTES:
                raise OutOfRange(f"size {want} is below XFS's minimum of {XFS_MIN_BYTES} bytes (dm.fs=xfs)")
        self._check_free(f"new layer {layer.id}")
        self._path(layer).mkdir(exist_ok=True)  # marks the layer as present (see _on_disk)
        if parent is None:
            layer, _ = self._pool_message(layer, "create_thin {id}")
        else:
            layer, _ = self._snapshot(layer, parent)
        layer = self.store.update(layer.id, extra={**layer.extra, "sectors": sectors})
        dev = self._ensure_device(layer)
        try:
            if layer.block:
                pass  # a raw device: thin provisioning reads unwritten blocks as zeros
            elif parent is None:
                cmd = (["mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1", str(dev)]
                       if self.cfg.fs == "ext4" else ["mkfs.xfs", "-q", "-f", "-K", str(dev)])
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise StrataError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
                if self.cfg.fs == "ext4":  # a new layer is empty: no lost+found in the volume
                    target = self._path(layer)
                    mnt.mount(mnt.Mount("ext4", str(dev), ()), target)
                    try:
                        (target / "lost+found").rmdir()
                    finally:
                        mnt.unmount(target)
            elif sectors > parent.extra["sectors"]:
                self._grow_fs(layer)
        finally:
            dm.remove(self._dev_name(layer.id))

    def _freeze(self, source: Layer, frozen: Layer) -> str | None:
        self._check_free(f"snapshot {frozen.id}")
        self._path(frozen).mkdir(exist_ok=True)
        frozen, _ = self._snapshot(frozen, source)
        self.store.update(frozen.id, extra={**frozen.extra, "sectors": source.extra["sectors"]})
        return source.parent

    def _destroy(self, layer_id: str) -> None:
        target = self.home / "mnt" / layer_id
        mnt.unmount(target)
        dm.remove(self._dev_name(layer_id))
        layer = self.store.get(layer_id)
        device_id = layer.extra.get("device_id") if layer is not None else None
        if device_id is not None:
            with self._pool_lock:
                try:
                    dm.message(self.pool, f"delete {device_id}")
                except dm.NoSuchDeviceId:
                    pass  # reserved but never created (crash before the create message)
                else:
                    self._commit_transaction()
        if target.exists():
            target.rmdir()

    def _on_disk(self) -> set[str]:
        return {p.name for p in (self.home / "mnt").iterdir()}

    def _path(self, layer: Layer) -> Path:
        return self.home / "mnt" / layer.id

    def _activate(self, layer: Layer, chain: list[Layer], mount_label: str) -> None:
        dev = self._ensure_device(layer)
        if layer.block:
            return  # the device is the volume: nothing to mount
        target = self._path(layer)
        target.mkdir(exist_ok=True)
        if not mnt.is_mount_point(target):
            options = self._mount_options(layer.frozen)
            if mount_label and os.path.isdir("/sys/fs/selinux"):  # each volume has its own superblock
                options = (*options, f'context="{mount_label}"')
            try:
                mnt.mount(mnt.Mount(self.cfg.fs, str(dev), options), target)
            except BaseException:
                dm.remove(self._dev_name(layer.id))
                raise

    def _deactivate(self, layer: Layer) -> None:
        mnt.unmount_all(self._path(layer))
        dm.remove(self._dev_name(layer.id))

    def _is_active(self, layer: Layer) -> bool:
        if layer.block:
            return dm.exists(self._dev_name(layer.id))
        return mnt.is_mount_point(self._path(layer))

    def _block_path(self, layer: Layer) -> Path:
        return dm.device_path(self._dev_name(layer.id))

    def _set_size(self, layer: Layer, size_bytes: int) -> None:
        sectors = self._sectors_for(size_bytes)
        if sectors <= layer.extra["sectors"]:
            return
        layer = self.store.update(layer.id, extra={**layer.extra, "sectors": sectors})
        name = self._dev_name(layer.id)
        if dm.exists(name):
            dm.reload(name, "thin", sectors, self._thin_params(layer.extra["device_id"]))
        if layer.block:
            return  # no filesystem to grow: the device is the volume
        self._grow_fs(layer)
        if not self._is_active(layer):
            dm.remove(name)

    def _allocated_blocks(self, layer: Layer) -> BlockMap:
        with thinmeta.metadata_snapshot(self.pool, self._metasnap_lock) as metadata:
            found = thinmeta.mapped(metadata, layer.extra["device_id"])
        return thinmeta.block_map(found, self.block_sectors * dm.SECTOR, layer.extra["sectors"] * dm.SECTOR)

    def _changed_blocks(self, base: Layer, layer: Layer) -> BlockMap:
        block, capacity = self.block_sectors * dm.SECTOR, layer.extra["sectors"] * dm.SECTOR
        if base.extra["sectors"] > layer.extra["sectors"]:
            raise FailedPrecondition(f"base layer {base.id} ({base.extra['sectors'] * dm.SECTOR} bytes) is larger "
                                     f"than layer {layer.id} ({capacity} bytes): the base must be the earlier one")
        if base.extra["device_id"] == layer.extra["device_id"]:
            return BlockMap(block_size=block, capacity_bytes=capacity)
        with thinmeta.metadata_snapshot(self.pool, self._metasnap_lock) as metadata:
            found = thinmeta.changed(metadata, base.extra["device_id"], layer.extra["device_id"])
        return thinmeta.block_map(found, block, capacity)

    def size_enforcement(self) -> str:
        return f"thin device size ({self.cfg.fs} on each thin device)"

    def _usage(self, layer: Layer) -> int | None:
        return None

    # ------------------------------------------------------------------ reporting

    def capacity(self) -> Capacity:
        """Pool data space; in loop-lvm mode never more than the file's filesystem has."""
        st = dm.pool_status(self.pool)
        block = self.block_sectors * dm.SECTOR
        total, free = st.total_data_blocks * block, st.free_data_blocks * block
        if self.cfg.pool_device is None:
            fs = os.statvfs(self.home)
            free = min(free, fs.f_bavail * fs.f_frsize)
        return Capacity(total_bytes=total, available_bytes=free)

    def _status_extra(self) -> list[tuple[str, str]]:
        st = dm.pool_status(self.pool)
        block = self.block_sectors * dm.SECTOR
        extra = [
            ("pool", self.pool),
            ("pool mode", "loop-lvm (sparse files, NOT FOR PRODUCTION)" if self.cfg.pool_device is None else "operator pool"),
            ("pool state", st.mode),
            ("data space used", f"{st.used_data_blocks * block} of {st.total_data_blocks * block} bytes"),
            ("metadata blocks used", f"{st.used_metadata_blocks} of {st.total_metadata_blocks}"),
            ("data block size", str(block)),
            ("transaction id", str(st.transaction_id)),
            ("filesystem", self.cfg.fs),
            ("changed-block tracking", "thin pool metadata (thin_dump, thin_delta)" if self.supports_block_metadata
             else f"off: {', '.join(thinmeta.missing_tools())} not installed (thin-provisioning-tools)"),
            ("base size", str(self.cfg.base_bytes)),
            ("min free space", f"{self.cfg.min_free_percent}%"),
        ]
        if self.cfg.pool_device is None:
            extra.append(("warning", LOOP_WARNING))
        return extra
