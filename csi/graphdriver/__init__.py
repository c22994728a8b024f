"""Layered storage: the driver contract, the shared machinery, the registry and the drivers.

Layout (each module's docstring states its contract or on-disk layout)::

    driver.py       the contract: value types and the Driver interface (types only)
    layered.py      LayerDriver: the contract implemented once over a few storage primitives
    metastore.py    the crash-safe layer records (sqlite, WAL) behind LayerDriver
    registry.py     per-node selection (explicit name, prior state, priority list)
    diff/           the one OCI layer-tar codec and the naive (tree-walking) differ
    quota/          XFS project quota and the layer-size policy on top of it
    vfs.py          the copy-based driver
    overlay/        overlay and aufs: layout, upper-dir diff, incremental freezes
    btrfs/          subvolumes and qgroups, with the ioctls they need
    devicemapper/   thin devices, with the DM ioctls

Nothing outside this package touches a driver's records: services call the contract only.
"""

from csi.graphdriver.driver import (
    Capacity, Change, ChangeKind, CreateOpts, Driver, Layer, LayerKind, LayerState, Reconciliation,
)

__all__ = [
    "Capacity", "Change", "ChangeKind", "CreateOpts", "Driver", "Layer", "LayerKind", "LayerState", "Reconciliation",
]
