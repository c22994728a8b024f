"""Layered storage: the driver contract, the registry and the drivers.

Public entry points: :class:`csi.graphdriver.base.Driver` (the contract),
:func:`csi.graphdriver.registry.new_driver` (per-node selection).
"""

from csi.graphdriver.base import Change, ChangeKind, CreateOpts, Driver, Layer, LayerKind

__all__ = ["Change", "ChangeKind", "CreateOpts", "Driver", "Layer", "LayerKind"]
