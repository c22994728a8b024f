"""Render the static manifests in deploy/ from the Helm chart (for kubectl users).

    .venv/bin/python deploy/render.py           # rewrite deploy/strata.yaml
    .venv/bin/python deploy/render.py --check   # exit 1 if deploy/strata.yaml is stale

The chart is rendered offline through Helm v4's Go SDK (helm-python-sdk) with release
``strata`` in namespace ``strata-system`` and :data:`STATIC_VALUES`; the objects are
ordered so that ``kubectl apply -f deploy/strata.yaml`` creates what others refer to first.
The peer certificate is not generated here (a key committed to the repository would be
public): create the Secret named in STATIC_VALUES first, as deploy/README.md shows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

DEPLOY = Path(__file__).resolve().parent
CHART = DEPLOY.parent / "charts" / "strata"
OUTPUT = DEPLOY / "strata.yaml"
RELEASE = "strata"
NAMESPACE = "strata-system"
STATIC_VALUES: dict[str, Any] = {"peers": {"tls": {"existingSecret": "strata-peer-tls"}}}
KIND_ORDER = ("Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
              "Secret", "Issuer", "Certificate", "CSIDriver", "StorageClass", "VolumeSnapshotClass",
              "VolumeGroupSnapshotClass", "Service", "DaemonSet",
              "Deployment", "ServiceMonitor")
HEADER = """\
# strata: static manifests for kubectl, generated from charts/strata by deploy/render.py.
# Do not edit: change the chart (or STATIC_VALUES in deploy/render.py) and run
#   .venv/bin/python deploy/render.py
# Before applying, create the peer certificate Secret strata-peer-tls (see deploy/README.md).
"""


def render() -> str:
    """The whole static manifest file, as :data:`OUTPUT` should hold it."""
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values=STATIC_VALUES, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects: list[dict[str, Any]] = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": NAMESPACE, "labels": {"pod-security.kubernetes.io/enforce": "privileged"}}}]
    for name in sorted(rendered):
        if not name.endswith(".txt"):
            objects += [doc for doc in yaml.safe_load_all(rendered[name]) if doc]
    for obj in objects:  # Helm bookkeeping labels mean nothing outside a release
        labels = obj["metadata"].get("labels", {})
        labels.pop("app.kubernetes.io/managed-by", None)
        labels.pop("helm.sh/chart", None)
    objects.sort(key=lambda o: (KIND_ORDER.index(o["kind"]), o["metadata"]["name"]))
    body = "---\n".join(yaml.safe_dump(o, sort_keys=False, width=120) for o in objects)
    return HEADER + "---\n" + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether the file is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is stale: run .venv/bin/python deploy/render.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
