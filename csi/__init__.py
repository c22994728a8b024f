"""strata: a Kubernetes CSI driver serving volumes from node-local layered storage."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("strata-csi")
except _metadata.PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+src"
