"""Snapshots as OCI artifacts: backup to, and restore from, an OCI registry or image layout.

Modules (each docstring states its contract or on-disk layout)::

    media.py      media types, descriptors, digests, the manifest and (image) config of a backup
    reference.py  the reference grammar: oci://host/repo[:tag][@sha256:…], oci-layout:/path[:tag][@…]
    target.py     the Target interface, digest-verifying reads, open_target(reference)
    layout.py     an OCI image layout directory (crash-safe blob and index writes)
    registry.py   a registry repository by the distribution spec (chunked streamed uploads,
                  cross-repo mounts, basic/bearer auth) over requests
    auth.py       credentials from a docker config JSON (dockerconfigjson Secret)
    index.py      imported-layer IDs (by ChainID), the export cache, the start-up sweep
    export.py     backup(driver, snapshot, target, …) -> BackupResult
    restore.py    restore(driver, target, digest, …) -> RestoreResult
    progress.py   Progress, callbacks, a terminal bar and JSON lines

Typical use::

    ref = parse_reference("oci://registry.example:5000/team/vol:daily")
    with closing(open_target(ref, credentials=load_docker_config(path), create=True)) as t:
        result = backup(driver, snapshot_layer, t, tag=ref.tag, facts=facts,
                        index=ExportIndex(home / "backup-index.json"), progress=renderer_for(sys.stderr))
    # later, on any node:
    ref = parse_reference(result.reference)
    with closing(open_target(ref, credentials=...)) as t:
        restored = restore(driver, t, ref.require_digest(), index=...)
    driver.create(volume_layer, parent=restored.layer_id, CreateOpts(size_bytes=...))
"""

from csi.backup.auth import Credentials, DockerConfig, load_docker_config, parse_docker_config
from csi.backup.export import BackupResult, backup, export_chain
from csi.backup.index import ExportIndex, imported_layer_id, is_temporary, sweep_temporaries
from csi.backup.media import Artifact, Descriptor, LayerFacts, VolumeFacts
from csi.backup.progress import JsonLines, Progress, ProgressCallback, TerminalBar, renderer_for
from csi.backup.reference import Reference, parse_reference
from csi.backup.restore import RestoreResult, read_artifact, restore
from csi.backup.target import Target
from csi.backup.targets import open_target

__all__ = [
    "Artifact", "BackupResult", "Credentials", "Descriptor", "DockerConfig", "ExportIndex", "JsonLines", "LayerFacts", "Progress", "ProgressCallback", "Reference",
    "RestoreResult", "Target", "TerminalBar", "VolumeFacts", "backup", "export_chain",
    "imported_layer_id", "is_temporary", "load_docker_config", "open_target", "parse_docker_config",
    "parse_reference", "read_artifact", "renderer_for", "restore", "sweep_temporaries",
]
