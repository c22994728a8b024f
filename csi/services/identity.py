"""CSI Identity service: plugin name and version, capabilities, readiness.

Contract: ``Probe`` is ready once start-up recovery has run (:attr:`Plugin.ready`), the
state store answers and the driver reports itself ``healthy()`` (the contract's own
check; nothing here looks at the driver's files).
"""

from __future__ import annotations

import grpc

from csi import __version__
from csi.proto import csi_pb2, csi_pb2_grpc
from csi.services.plugin import Plugin

_Service = csi_pb2.PluginCapability.Service
_Expansion = csi_pb2.PluginCapability.VolumeExpansion


class IdentityService(csi_pb2_grpc.IdentityServicer):
    def __init__(self, plugin: Plugin) -> None:
        self.plugin = plugin

    def GetPluginInfo(self, request: csi_pb2.GetPluginInfoRequest,
                      context: grpc.ServicerContext) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(
            name=self.plugin.config.driver_name, vendor_version=__version__,
            manifest={"layered-driver": self.plugin.driver.name, "node": self.plugin.node_id})

    def GetPluginCapabilities(self, request: csi_pb2.GetPluginCapabilitiesRequest,
                              context: grpc.ServicerContext) -> csi_pb2.GetPluginCapabilitiesResponse:
        caps = [csi_pb2.PluginCapability(service=_Service(type=t))
                for t in (_Service.CONTROLLER_SERVICE, _Service.GROUP_CONTROLLER_SERVICE,
                          _Service.VOLUME_ACCESSIBILITY_CONSTRAINTS) + ((_Service.SNAPSHOT_METADATA_SERVICE,) if self.plugin.driver.supports_block_metadata else ())]
        caps.append(csi_pb2.PluginCapability(volume_expansion=_Expansion(type=_Expansion.ONLINE)))
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=caps)

    def Probe(self, request: csi_pb2.ProbeRequest, context: grpc.ServicerContext) -> csi_pb2.ProbeResponse:
        ready = self.plugin.ready.is_set()
        if ready:
            self.plugin.store.ping()
            ready = self.plugin.driver.healthy()
        return csi_pb2.ProbeResponse(ready={"value": ready})
