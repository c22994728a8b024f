"""The Helm chart, checked without a cluster: Helm v4 (through helm-python-sdk) lints and
renders it offline with default values and a matrix of other values; every rendered object
is validated against the Kubernetes API schemas (kubernetes-validate, offline) or, for the
custom kinds, against crd_schemas.py; then checks read the objects: sidecars and their
arguments, names and socket paths that must agree, RBAC per sidecar, images, classes and
the per-node driver groups.
"""

from __future__ import annotations

import base64

from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
from manifests import CHART, Obj, container, flag, objects, of_kind, one, render, validate

GROUPED = {
    "driverGroups": [
        {"name": "fast", "nodeSelector": {"disk": "nvme"}, "driver": "btrfs"},
        {"name": "thin", "nodeSelector": {"pool": "thin", "zone": "b"}, "driver": "devicemapper",
         "storageOpts": ["dm.thinpooldev=/dev/mapper/vg-thinpool", "dm.fs=xfs"]},
    ],
}
MATRIX: dict[str, dict[str, Any]] = {
    "default": {},
    "driver-groups": GROUPED,
    "everything-on": {
        **GROUPED,
        "driver": "overlay",
        "logLevel": "debug",
        "storageClass": {"isDefault": True, "parameters": {"layeredDriver": "overlay"}},
        "perDriverStorageClasses": ["btrfs", "overlay"],
        "volumeSnapshotClass": {"isDefault": True, "deletionPolicy": "Retain"},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
        "imagePullSecrets": [{"name": "regcred"}],
        "node": {"nodeSelector": {"kubernetes.io/os": "linux"}, "priorityClassName": "high"},
        "controller": {"replicas": 2, "nodeSelector": {"role": "infra"}},
        "backup": {"enabled": True, "target": "oci://registry.example.com:5000/backups/strata"},
        "snapshotMetadata": {"enabled": True},
    },
    "custom-paths-and-name": {
        "driverName": "layers.example.org",
        "rootDir": "/mnt/layers",
        "kubeletDir": "/var/snap/microk8s/common/var/lib/kubelet",
        "peers": {"port": 19820, "audience": "layers-peer", "tls": {"existingSecret": "my-peer-tls"}},
        "node": {"healthPort": 19808},
    },
    "cert-manager": {"peers": {"tls": {"certManager": {"enabled": True}}},
                     "volumeGroupSnapshotClass": {"isDefault": True, "deletionPolicy": "Retain"}},
    "cert-manager-own-issuer": {"peers": {"tls": {"certManager": {
        "enabled": True, "issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"}}}}},
    # backups without the sidecar: only the classes and the Secret's Role
    "backup-classes-only": {"backup": {"enabled": True, "target": "oci://registry.example.com/team/vols",
                                       "compression": "none", "registrySecret": "team-registry",
                                       "sidecar": {"enabled": False},
                                       "volumeSnapshotClass": {"name": "offsite", "deletionPolicy": "Retain"}},
                            "volumeSnapshotClass": {"create": False}, "perDriverStorageClasses": ["vfs"],
                            "storageClass": {"parameters": {"csi.storage.k8s.io/fstype": "xfs"}}},
    "no-expansion-no-metrics": {"controller": {"enabled": False}, "metrics": {"enabled": False},
                                "storageClass": {"create": False}, "volumeSnapshotClass": {"create": False},
                                "volumeGroupSnapshotClass": {"create": False}},
}
CASES = list(MATRIX.items())
IDS = list(MATRIX)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    return {name: objects(values) for name, values in MATRIX.items()}


def values_of(case: str) -> dict[str, Any]:
    with helm.Chart.load(CHART) as chart:
        return chart.merge_values(MATRIX[case])


@pytest.mark.parametrize(("case", "values"), CASES, ids=IDS)
def test_helm_lint_is_clean(case: str, values: dict[str, Any]) -> None:
    report = helm.lint(CHART, values, strict=True, namespace="strata-system", kube_version="v1.30.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2 or m["severity"] == 0]
    assert report["errors"] == [] and problems == [], report
    # The one remaining note is Helm's "icon is recommended" (no icon is published yet).
    assert all(m["severity"] == 1 for m in report["messages"])


@pytest.mark.parametrize("case", IDS)
def test_every_object_is_valid_against_the_api_schemas(case: str, rendered: dict[str, list[Obj]]) -> None:
    objs = rendered[case]
    assert objs
    for obj in objs:
        validate(obj)


def test_validation_catches_a_broken_object(rendered: dict[str, list[Obj]]) -> None:
    """The validators are not vacuous: a misspelled field fails for core and custom kinds."""
    import copy

    import jsonschema

    ds = copy.deepcopy(one(rendered["default"], "DaemonSet"))
    ds["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(jsonschema.ValidationError):
        validate(ds)
    vsc = copy.deepcopy(one(rendered["default"], "VolumeSnapshotClass"))
    vsc["deletionPolicy"] = "Keep"
    with pytest.raises(jsonschema.ValidationError):
        validate(vsc)


def test_values_schema_refuses_bad_values() -> None:
    for bad in ({"driver": "zfs"}, {"images": {"provisioner": {"tag": "latest"}}}, {"driverz": "auto"},
                {"driverGroups": [{"name": "x", "nodeSelector": {}, "driver": "btrfs"}]},
                {"storageOpts": ["no-equals-sign"]},
                {"logLevel": 3}, {"perDriverStorageClasses": ["nfs"]},
                {"storageClass": {"parameters": {"sizeLimit": "1"}}},
                {"backup": {"target": "https://registry.example.com/backups"}},
                {"backup": {"target": "oci://registry.example.com/backups:daily"}},
                {"backup": {"target": "oci://registry.example.com/backups@sha256:" + "0" * 64}},
                {"backup": {"compression": "gzip"}}, {"backup": {"sidecar": {"enabled": "yes"}}},
                {"backup": {"volumeSnapshotClass": {"isDefault": True}}}, {"backup": {"registrySecret": ""}}):
        with pytest.raises(helm.HelmError):
            render(bad)


def test_chart_made_peer_certificate_serves_tls_for_the_peer_name(tmp_path: Path) -> None:
    """The Secret genCA/genSignedCert make is usable as it is: a real TLS listener serves it and
    a client trusting its ca.crt and checking the peer name connects; with another name it fails."""
    import base64

    import grpc

    from csi.peers.tls import TlsFiles, client_channel, listen_tls
    from csi.services.listen import new_server

    objs = objects({})
    secret = one(objs, "Secret", "strata-peer-tls")
    assert secret["type"] == "kubernetes.io/tls"
    for key in ("tls.crt", "tls.key", "ca.crt"):
        (tmp_path / key).write_bytes(base64.b64decode(secret["data"][key]))
    server = new_server(2, "t")
    port = listen_tls(server, "127.0.0.1:0", TlsFiles(tmp_path / "tls.crt", tmp_path / "tls.key"))
    server.start()
    try:
        for name, ok in (("strata-peer.strata-system.svc", True), ("someone-else.example", False)):
            channel = client_channel(f"127.0.0.1:{port}", tmp_path / "ca.crt", server_name=name)
            try:
                grpc.channel_ready_future(channel).result(timeout=5)
                connected = True
            except grpc.FutureTimeoutError:
                connected = False
            finally:
                channel.close()
            assert connected is ok, name
    finally:
        server.stop(0)
    # a second render (no cluster: lookup finds nothing) makes a new CA; in a cluster lookup keeps it
    template = (CHART / "templates" / "peer-tls.yaml").read_text()
    assert 'lookup "v1" "Secret" .Release.Namespace $secret' in template


@pytest.mark.parametrize("case", IDS)
def test_images_are_pinned(case: str, rendered: dict[str, list[Obj]]) -> None:
    for obj in rendered[case]:
        if obj["kind"] not in ("DaemonSet", "Deployment"):
            continue
        for c in obj["spec"]["template"]["spec"]["containers"]:
            repository, sep, tag = c["image"].rpartition(":")
            assert sep and "/" in repository and tag and tag != "latest", c["image"]


@pytest.mark.parametrize("case", IDS)
def test_node_plugin_and_sidecars(case: str, rendered: dict[str, list[Obj]]) -> None:
    values = values_of(case)
    objs = rendered[case]
    driver = one(objs, "CSIDriver")
    for ds in of_kind(objs, "DaemonSet"):
        pod = ds["spec"]["template"]["spec"]
        names = [c["name"] for c in pod["containers"]]
        backup = values["backup"]["enabled"] and values["backup"]["sidecar"]["enabled"]
        assert names == ["strata", "node-driver-registrar", "csi-provisioner", "csi-snapshotter",
                         *(["backup"] if backup else []), "liveness-probe"]
        plugin = container(ds, "strata")
        assert plugin["command"] == ["strata", "serve"]
        assert all(arg.startswith("--") for arg in plugin["args"]), plugin["args"]
        assert plugin["securityContext"]["privileged"] is True
        # CSIDriver name == plugin's --driver-name.
        assert flag(plugin, "driver-name") == driver["metadata"]["name"] == values["driverName"]
        assert flag(plugin, "root") == values["rootDir"]
        assert flag(plugin, "node-id") == "$(NODE_NAME)"
        mounts = {m["name"]: m for m in plugin["volumeMounts"]}
        assert mounts["kubelet-dir"]["mountPath"] == values["kubeletDir"]
        assert mounts["kubelet-dir"]["mountPropagation"] == "Bidirectional"
        assert mounts["strata-root"]["mountPath"] == values["rootDir"]
        assert mounts["strata-root"]["mountPropagation"] == "Bidirectional"
        assert mounts["dev"]["mountPath"] == "/dev"

        provisioner = container(ds, "csi-provisioner")
        for name, want in {"node-deployment": "true", "strict-topology": "true",
                           "immediate-topology": "false", "enable-capacity": "true",
                           "capacity-ownerref-level": "0", "extra-create-metadata": "true"}.items():
            assert flag(provisioner, name) == want, name
        env = {e["name"]: e for e in provisioner["env"]}
        assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"  # capacity owner
        assert env["NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
        snapshotter = container(ds, "csi-snapshotter")
        assert flag(snapshotter, "node-deployment") == "true"
        assert flag(snapshotter, "extra-create-metadata") == "true"
        assert any(e["name"] == "NODE_NAME" for e in snapshotter["env"])
        # No leader election in node-deployment mode (and no lease RBAC for it).
        assert flag(provisioner, "leader-election") is None and flag(snapshotter, "leader-election") is None

        # Socket paths agree: the plugin listens where every sidecar dials, and the
        # registrar tells kubelet the host path of that same socket.
        volumes = {v["name"]: v for v in pod["volumes"]}
        endpoint = flag(plugin, "endpoint")
        assert endpoint == "unix:///csi/csi.sock"
        for c in pod["containers"]:
            socket_mount = [m for m in c["volumeMounts"] if m["name"] == "socket-dir"]
            assert socket_mount and socket_mount[0]["mountPath"] == "/csi", c["name"]
            if c["name"] not in ("strata", "backup"):
                assert flag(c, "csi-address") == "/csi/csi.sock", c["name"]
        host_dir = volumes["socket-dir"]["hostPath"]["path"]
        assert host_dir == f"{values['kubeletDir']}/plugins/{values['driverName']}"
        registrar = container(ds, "node-driver-registrar")
        assert flag(registrar, "kubelet-registration-path") == f"{host_dir}/csi.sock"
        assert volumes["registration-dir"]["hostPath"]["path"] == f"{values['kubeletDir']}/plugins_registry"
        assert {"name": "registration-dir", "mountPath": "/registration"} in registrar["volumeMounts"]
        assert volumes["kubelet-dir"]["hostPath"]["path"] == values["kubeletDir"]

        # livenessprobe serves the plugin container's probe.
        probe = container(ds, "liveness-probe")
        assert flag(probe, "http-endpoint") == f":{values['node']['healthPort']}"
        ports = {p["name"]: p["containerPort"] for p in plugin["ports"]}
        assert ports["healthz"] == values["node"]["healthPort"]
        assert plugin["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
        assert pod["serviceAccountName"] == one(objs, "ServiceAccount", "strata-node")["metadata"]["name"]
        assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
        # On the host network every port of the pod is a host port: none may be taken twice.
        host_ports = [p["containerPort"] for c in pod["containers"] for p in c.get("ports", [])]
        assert len(host_ports) == len(set(host_ports)), host_ports

        # The backup container: strata's image idling for `kubectl exec … strata backup`, as root
        # (export.sock is 0600 root) but unprivileged, with the registry Secret as $DOCKER_CONFIG.
        if backup:
            agent = container(ds, "backup")
            assert agent["image"] == plugin["image"] and agent["command"] == ["sleep", "infinity"]
            assert "args" not in agent and "ports" not in agent
            assert agent["securityContext"] == {"runAsUser": 0, "allowPrivilegeEscalation": False,
                                                "capabilities": {"drop": ["ALL"]}}
            assert agent["resources"] == values["node"]["sidecarResources"]
            env = {e["name"]: e["value"] for e in agent["env"]}
            mounts = {m["name"]: m for m in agent["volumeMounts"]}
            assert set(mounts) == {"socket-dir", "backup-registry"}
            registry = mounts["backup-registry"]
            assert registry["readOnly"] is True and env == {"DOCKER_CONFIG": registry["mountPath"]}
            assert volumes["backup-registry"]["secret"] == {
                "secretName": values["backup"]["registrySecret"], "optional": True, "defaultMode": 0o400,
                "items": [{"key": ".dockerconfigjson", "path": "config.json"}]}
        else:
            assert "backup-registry" not in volumes


# Flags each sidecar deprecates (or has removed), keyed by the image's name, from the sidecars'
# own READMEs and release notes (kubernetes-csi/*):
#   external-provisioner README "Deprecated arguments": --connection-timeout, --provisioner;
#     "--metrics-address: (deprecated)"; PR #1167 (v5.0.0): the Topology gate is GA, on by default
#     and "will be removed in a future release" (strata reports VOLUME_ACCESSIBILITY_CONSTRAINTS).
#   external-snapshotter: --metrics-address (deprecated), --connection-timeout (removed);
#     v8.2.0 replaced --enable-volume-group-snapshots with --feature-gates=CSIVolumeGroupSnapshot.
#   external-resizer README: "--metrics-address: (deprecated)"; --csiTimeout (old spelling of --timeout).
#   node-driver-registrar README: "--health-port: (deprecated)", "--mode: DEPRECATED",
#     --connection-timeout (deprecated, no effect).
#   livenessprobe cmd/livenessprobe/main.go: --health-port and --metrics-address "(deprecated)"
#     (PR #99, v2.2.0: use --http-endpoint); --connection-timeout removed in v2.0.0.
#   All of them take klog's flags, of which KEP-2845 (Kubernetes 1.23) deprecated these.
# A value of None deprecates the flag; a string deprecates that gate in --feature-gates.
KLOG_DEPRECATED = ("log-dir", "log-file", "log-flush-frequency", "logtostderr", "alsologtostderr", "one-output",
                   "stderrthreshold", "log-file-max-size", "skip-log-headers", "add-dir-header", "skip-headers")
DEPRECATED_FLAGS: dict[str, dict[str, str | None]] = {
    "csi-provisioner": {"connection-timeout": None, "provisioner": None, "metrics-address": None,
                        "leader-election-type": None, "enable-leader-election": None, "feature-gates": "Topology"},
    "csi-snapshotter": {"connection-timeout": None, "metrics-address": None, "leader-election-type": None,
                        "enable-volume-group-snapshots": None},
    "csi-resizer": {"connection-timeout": None, "metrics-address": None, "csiTimeout": None,
                    "leader-election-type": None},
    "csi-node-driver-registrar": {"connection-timeout": None, "health-port": None, "mode": None},
    "livenessprobe": {"connection-timeout": None, "health-port": None, "metrics-address": None},
    # external-snapshot-metadata v1.0.0 (README, cmd/csi-snapshot-metadata): no deprecated flag of its own
    "csi-snapshot-metadata": {},
}


def sidecar_of(c: Obj) -> str:
    """The kubernetes-csi project a container runs, from its image name (not the container name)."""
    return c["image"].rpartition(":")[0].rpartition("/")[2]


def deprecated_args(c: Obj) -> list[str]:
    """The container's arguments that its sidecar deprecates (empty for strata's own containers)."""
    table = DEPRECATED_FLAGS.get(sidecar_of(c))
    if table is None:
        return []
    found = []
    for arg in c.get("args", []):
        name, _, value = arg.lstrip("-").partition("=")
        if name in KLOG_DEPRECATED:
            found.append(arg)
        elif name in table:
            gate = table[name]
            if gate is None or any(g.split("=")[0].strip() == gate for g in value.split(",")):
                found.append(arg)
    return found


@pytest.mark.parametrize("case", IDS)
def test_no_sidecar_runs_a_deprecated_flag(case: str, rendered: dict[str, list[Obj]]) -> None:
    seen = set()
    strata = values_of(case)["images"]["strata"]
    for obj in rendered[case]:
        if obj["kind"] not in ("DaemonSet", "Deployment"):
            continue
        for c in obj["spec"]["template"]["spec"]["containers"]:
            if c["image"] == f"{strata['repository']}:{strata['tag']}":  # strata's own (strata, backup)
                continue
            sidecar = sidecar_of(c)
            assert sidecar in DEPRECATED_FLAGS, f"{c['name']} runs {sidecar}: add its deprecated flags to the table"
            seen.add(sidecar)
            assert deprecated_args(c) == [], (obj["metadata"]["name"], c["name"])
    if values_of(case)["controller"]["enabled"]:
        expected = set(DEPRECATED_FLAGS) - (set() if values_of(case)["snapshotMetadata"]["enabled"]
                                            else {"csi-snapshot-metadata"})
        assert seen == expected


def test_deprecated_flag_check_finds_them(rendered: dict[str, list[Obj]]) -> None:
    """The check is not vacuous: each old spelling this chart once used, put back, is found."""
    import copy

    ds = one(rendered["default"], "DaemonSet")
    for name, bad in (("liveness-probe", "--health-port=9808"), ("csi-provisioner", "--feature-gates=Topology=true"),
                      ("csi-provisioner", "--feature-gates=HonorPVReclaimPolicy=true,Topology=true"),
                      ("node-driver-registrar", "--mode=kubelet-registration-probe"),
                      ("csi-snapshotter", "--logtostderr=false")):
        c = copy.deepcopy(container(ds, name))
        c["args"].append(bad)
        assert deprecated_args(c) == [bad], (name, bad)
    c = copy.deepcopy(container(ds, "csi-provisioner"))
    c["args"].append("--feature-gates=HonorPVReclaimPolicy=true")
    assert deprecated_args(c) == []


def test_csidriver_object(rendered: dict[str, list[Obj]]) -> None:
    spec = one(rendered["default"], "CSIDriver")["spec"]
    assert spec["attachRequired"] is False
    assert spec["podInfoOnMount"] is True
    assert spec["volumeLifecycleModes"] == ["Persistent", "Ephemeral"]
    assert spec["fsGroupPolicy"] == "File"
    assert spec["storageCapacity"] is True
    assert spec["seLinuxMount"] is False


@pytest.mark.parametrize("case", IDS)
def test_peer_channel_settings_agree(case: str, rendered: dict[str, list[Obj]]) -> None:
    """Every strata pod: the same peer Secret and port, a projected token for the audience the
    listener asks for, the accounts the listener admits are the ones the pods run as."""
    values = values_of(case)
    objs = rendered[case]
    peers = values["peers"]
    peer_name = "strata-peer.strata-system.svc"
    secret_name = peers["tls"]["existingSecret"] or "strata-peer-tls"

    def mounted(owner: Obj, c: Obj, volume_name: str) -> tuple[str, Obj]:
        mount = next(m for m in c["volumeMounts"] if m["name"] == volume_name)
        assert mount["readOnly"] is True
        return mount["mountPath"], next(v for v in owner["spec"]["template"]["spec"]["volumes"]
                                        if v["name"] == volume_name)

    def token_of(owner: Obj, c: Obj) -> str:
        path, volume = mounted(owner, c, "peer-token")
        (source,) = volume["projected"]["sources"]
        sat = source["serviceAccountToken"]
        assert sat["audience"] == peers["audience"]
        assert sat["expirationSeconds"] == peers["tokenExpirationSeconds"]
        return f"{path}/{sat['path']}"

    for ds in of_kind(objs, "DaemonSet"):
        c = container(ds, "strata")
        assert flag(c, "peer-listen") == f"$(NODE_IP):{peers['port']}"
        assert {e["name"]: e for e in c["env"]}["NODE_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
        assert {"name": "peer", "containerPort": peers["port"], "protocol": "TCP"} in c["ports"]
        # the bulk lane beside the listener: its own host port, announced in the tickets
        assert flag(c, "bulk-port") == str(peers["bulkPort"]) and peers["bulkPort"] != peers["port"]
        assert {"name": "peer-bulk", "containerPort": peers["bulkPort"], "protocol": "TCP"} in c["ports"]
        assert flag(c, "digest-snapshots") == ("yes" if peers["digestSnapshots"] else "no")
        tls_dir, volume = mounted(ds, c, "peer-tls")
        assert volume["secret"]["secretName"] == secret_name
        assert flag(c, "tls-cert") == f"{tls_dir}/tls.crt" and flag(c, "tls-key") == f"{tls_dir}/tls.key"
        assert flag(c, "tls-ca") == f"{tls_dir}/ca.crt"
        assert flag(c, "token-file") == token_of(ds, c)
        assert flag(c, "peer-audience") == peers["audience"]
        assert flag(c, "peer-server-name") == peer_name
        assert flag(c, "peer-account") == f"strata-system/{ds['spec']['template']['spec']['serviceAccountName']}"
        assert flag(c, "forward-listen") is None and flag(c, "forward-token-file") is None
        assert flag(c, "controller-account") == ("strata-system/strata-controller"
                                                 if values["controller"]["enabled"] else None)
    deployments = of_kind(objs, "Deployment")
    if not values["controller"]["enabled"]:
        assert deployments == []
        assert all(sc.get("allowVolumeExpansion") is False for sc in of_kind(objs, "StorageClass"))
    else:
        (deployment,) = deployments
        forwarder = container(deployment, "strata-controller")
        resizer = container(deployment, "csi-resizer")
        assert forwarder["command"] == ["strata", "controller"]
        assert flag(forwarder, "endpoint") == "unix:///csi/csi.sock"
        assert flag(resizer, "csi-address") == "/csi/csi.sock"
        assert flag(forwarder, "driver-name") == values["driverName"]
        assert flag(resizer, "leader-election") == "true"
        assert flag(resizer, "handle-volume-inuse-error") == "false"  # strata expands online
        assert flag(forwarder, "peer-port") == str(peers["port"])
        assert flag(forwarder, "peer-server-name") == peer_name
        assert flag(forwarder, "token-file") == token_of(deployment, forwarder)
        ca_dir, volume = mounted(deployment, forwarder, "peer-ca")
        assert volume["secret"]["secretName"] == secret_name
        assert volume["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]  # never the node's key
        assert flag(forwarder, "tls-ca") == f"{ca_dir}/ca.crt"
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
    # where the certificate comes from
    certificates = of_kind(objs, "Certificate")
    if peers["tls"]["existingSecret"]:
        assert of_kind(objs, "Secret") == [] and certificates == []
    elif peers["tls"]["certManager"]["enabled"]:
        assert of_kind(objs, "Secret") == []
        peer = one(objs, "Certificate", "strata-peer")
        assert peer["spec"]["secretName"] == secret_name and peer["spec"]["dnsNames"] == [peer_name]
        assert set(peer["spec"]["usages"]) == {"server auth", "client auth"}
        issuer = peers["tls"]["certManager"]["issuerRef"]
        if issuer:
            assert peer["spec"]["issuerRef"]["name"] == issuer["name"] and of_kind(objs, "Issuer") == []
        else:
            ca_issuer = one(objs, "Issuer", peer["spec"]["issuerRef"]["name"])
            ca = one(objs, "Certificate", "strata-peer-ca")
            assert ca["spec"]["isCA"] is True and ca_issuer["spec"]["ca"]["secretName"] == ca["spec"]["secretName"]
            assert "selfSigned" in one(objs, "Issuer", ca["spec"]["issuerRef"]["name"])["spec"]
    else:
        assert certificates == []
        secret = one(objs, "Secret", secret_name)
        assert set(secret["data"]) == {"tls.crt", "tls.key", "ca.crt"}


# RBAC: what each component calls, from the sidecars' own RBAC files (versions and the
# optional rules left out are cited in the templates). (apiGroup, resource) -> verbs.
Rules = dict[tuple[str, ...], set[str]]
PROVISIONER: Rules = {
    ("", "persistentvolumes"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "persistentvolumeclaims"): {"get", "list", "watch", "update"},
    ("storage.k8s.io", "storageclasses"): {"get", "list", "watch"},
    ("", "events"): {"list", "watch", "create", "update", "patch"},
    ("snapshot.storage.k8s.io", "volumesnapshots"): {"get", "list"},
    ("snapshot.storage.k8s.io", "volumesnapshotcontents"): {"get", "list"},
    ("storage.k8s.io", "csinodes"): {"get", "list", "watch"},
    ("", "nodes"): {"get", "list", "watch"},
    ("storage.k8s.io", "csistoragecapacities"): {"get", "list", "watch", "create", "update", "patch", "delete"},
    ("", "pods"): {"get"},  # capacity owner (--capacity-ownerref-level=0)
    ("storage.k8s.io", "volumeattributesclasses"): {"get", "list", "watch"},
}
SNAPSHOTTER: Rules = {
    ("", "events"): {"list", "watch", "create", "update", "patch"},
    ("snapshot.storage.k8s.io", "volumesnapshotclasses"): {"get", "list", "watch"},
    ("snapshot.storage.k8s.io", "volumesnapshotcontents"): {"create", "get", "list", "watch", "update", "patch"},
    ("snapshot.storage.k8s.io", "volumesnapshotcontents/status"): {"update", "patch"},
    # group snapshots (--feature-gates=CSIVolumeGroupSnapshot=true)
    ("groupsnapshot.storage.k8s.io", "volumegroupsnapshotclasses"): {"get", "list", "watch"},
    ("groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents"): {"get", "list", "watch", "update", "patch"},
    ("groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents/status"): {"update", "patch"},
}
STRATA_NODE: Rules = {
    ("", "nodes"): {"get"},  # the driver label; other nodes' InternalIP (the peer dialer)
    ("authentication.k8s.io", "tokenreviews"): {"create"},  # the peer listener's callers
    ("authorization.k8s.io", "subjectaccessreviews"): {"create"},  # per-VolumeSnapshot export checks
    ("snapshot.storage.k8s.io", "volumesnapshots"): {"get"},  # VolumeSnapshot -> handle
    ("snapshot.storage.k8s.io", "volumesnapshotcontents"): {"get"},
}
# backup.enabled: csi-provisioner and csi-snapshotter get the registry Secret named in the
# classes' CSI secret parameters (by name only); (group, resource, name) is a rule with resourceNames.
BACKUP_NAMESPACED: Rules = {
    ("", "secrets", "strata-backup-registry"): {"get"},  # snapshotter(-list) and provisioner secrets
}
# backup.sidecar.enabled: the backup container, under the node account.
BACKUP: Rules = {
    ("snapshot.storage.k8s.io", "volumesnapshots"): {"get", "list", "watch"},  # which snapshot to push
    ("snapshot.storage.k8s.io", "volumesnapshotcontents"): {"get", "list", "watch"},  # its snapshotHandle
    ("snapshot.storage.k8s.io", "volumesnapshotclasses"): {"get", "list"},  # which class uploads where
}
RESIZER: Rules = {  # pods left out: only for --handle-volume-inuse-error, which is off
    ("", "persistentvolumes"): {"get", "list", "watch", "patch"},
    ("", "persistentvolumeclaims"): {"get", "list", "watch"},
    ("", "persistentvolumeclaims/status"): {"patch"},
    ("", "events"): {"list", "watch", "create", "update", "patch"},
    ("storage.k8s.io", "volumeattributesclasses"): {"get", "list", "watch"},
}
RESIZER_NAMESPACED: Rules = {("coordination.k8s.io", "leases"): {"get", "watch", "list", "delete", "update", "create"}}
SNAPSHOT_METADATA: Rules = {  # external-snapshot-metadata v1.0.0 (its deploy/snapshot-metadata-cluster-role.yaml)
    ("cbt.storage.k8s.io", "snapshotmetadataservices"): {"get", "list", "watch"},  # its own object
    ("authentication.k8s.io", "tokenreviews"): {"create"},  # the backup client's audience-scoped token
    ("authorization.k8s.io", "subjectaccessreviews"): {"create"},  # may it read VolumeSnapshots there
    ("snapshot.storage.k8s.io", "volumesnapshots"): {"get", "list"},  # namespace/name -> content -> handle
    ("snapshot.storage.k8s.io", "volumesnapshotcontents"): {"get", "list"},
}
STRATA_CONTROLLER: Rules = {("", "nodes"): {"get"}}  # the owner node's InternalIP


def merge(*tables: Rules) -> Rules:
    out: Rules = {}
    for table in tables:
        for key, verbs in table.items():
            out.setdefault(key, set()).update(verbs)
    return out


def granted(objs: list[Obj], account: str, role_kind: str, binding_kind: str) -> Rules:
    """What ``account`` holds through ``binding_kind``s of ``role_kind``s, per (group, resource)."""
    roles = {o["metadata"]["name"]: o for o in of_kind(objs, role_kind)}
    out: Rules = {}
    for binding in of_kind(objs, binding_kind):
        if not any(s["kind"] == "ServiceAccount" and s["name"] == account and s["namespace"] == "strata-system"
                   for s in binding["subjects"]):
            continue
        assert binding["roleRef"]["kind"] == role_kind
        for rule in roles[binding["roleRef"]["name"]]["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
            assert "nonResourceURLs" not in rule
            names = rule.get("resourceNames")
            assert names is None or (names and role_kind == "Role"), rule  # only a namespaced Role names objects
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for key in ([(group, resource, n) for n in names] if names else [(group, resource)]):
                        out.setdefault(key, set()).update(rule["verbs"])
    return out


@pytest.mark.parametrize("case", IDS)
def test_rbac_is_exactly_what_each_component_calls(case: str, rendered: dict[str, list[Obj]]) -> None:
    objs = rendered[case]
    backup = values_of(case)["backup"]
    sidecar = backup["enabled"] and backup["sidecar"]["enabled"]
    assert granted(objs, "strata-node", "ClusterRole", "ClusterRoleBinding") == merge(
        PROVISIONER, SNAPSHOTTER, STRATA_NODE, BACKUP if sidecar else {})
    secret = backup["registrySecret"]
    assert granted(objs, "strata-node", "Role", "RoleBinding") == (
        {(g, r, secret): verbs for (g, r, _), verbs in BACKUP_NAMESPACED.items()} if backup["enabled"] else {})
    if values_of(case)["controller"]["enabled"]:
        cbt = SNAPSHOT_METADATA if values_of(case)["snapshotMetadata"]["enabled"] else {}
        assert granted(objs, "strata-controller", "ClusterRole", "ClusterRoleBinding") == merge(
            RESIZER, STRATA_CONTROLLER, cbt)
        assert granted(objs, "strata-controller", "Role", "RoleBinding") == RESIZER_NAMESPACED
    else:
        assert granted(objs, "strata-controller", "ClusterRole", "ClusterRoleBinding") == {}
    # Every pod runs under one of these two accounts, no default account.
    accounts = {o["spec"]["template"]["spec"]["serviceAccountName"]
                for o in objs if o["kind"] in ("DaemonSet", "Deployment")}
    assert accounts <= {"strata-node", "strata-controller"}


@pytest.mark.parametrize("case", IDS)
def test_classes(case: str, rendered: dict[str, list[Obj]]) -> None:
    values = values_of(case)
    objs = rendered[case]
    backup = values["backup"]
    classes = {o["metadata"]["name"]: o for o in of_kind(objs, "StorageClass")}
    expected = ([values["storageClass"]["name"]] if values["storageClass"]["create"] else []) + \
        [f"{values['storageClass']['name']}-{d}" for d in values["perDriverStorageClasses"]]
    assert sorted(classes) == sorted(expected)
    for name, sc in classes.items():
        assert sc["provisioner"] == values["driverName"]
        assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
        assert sc["allowVolumeExpansion"] is values["controller"]["enabled"]
        driver = name.removeprefix(values["storageClass"]["name"] + "-") if name != values["storageClass"]["name"] \
            else None
        parameters = sc.get("parameters", {})
        backup_keys = {"backupTarget", "csi.storage.k8s.io/provisioner-secret-name",
                       "csi.storage.k8s.io/provisioner-secret-namespace"}
        if backup["enabled"]:
            assert parameters["backupTarget"] == backup["target"]
        else:
            assert not backup_keys & set(parameters)
        # the user's parameters are kept beside the backup ones
        assert {k: v for k, v in parameters.items() if k not in backup_keys | {"layeredDriver"}} == \
            {k: v for k, v in values["storageClass"]["parameters"].items() if k != "layeredDriver"}
        if driver:
            assert sc["allowedTopologies"] == [{"matchLabelExpressions": [
                {"key": f"{values['driverName']}/layered-driver", "values": [driver]}]}]
            assert parameters["layeredDriver"] == driver
        else:
            assert "allowedTopologies" not in sc
            default = sc["metadata"].get("annotations", {}).get("storageclass.kubernetes.io/is-default-class")
            assert default == ("true" if values["storageClass"]["isDefault"] else None)
    snapshot_classes = {o["metadata"]["name"]: o for o in of_kind(objs, "VolumeSnapshotClass")}
    backup_class = backup["enabled"] and backup["volumeSnapshotClass"]["create"]
    assert sorted(snapshot_classes) == sorted(
        ([values["volumeSnapshotClass"]["name"]] if values["volumeSnapshotClass"]["create"] else [])
        + ([backup["volumeSnapshotClass"]["name"]] if backup_class else []))
    for name, vsc in snapshot_classes.items():
        assert vsc["driver"] == values["driverName"]
        if name == values["volumeSnapshotClass"]["name"]:
            assert vsc["deletionPolicy"] == values["volumeSnapshotClass"]["deletionPolicy"]
            assert "parameters" not in vsc  # plain snapshots never leave the node
        else:
            assert vsc["deletionPolicy"] == backup["volumeSnapshotClass"]["deletionPolicy"]
            assert "annotations" not in vsc["metadata"]  # never the default class
            assert vsc["parameters"]["backupTarget"] == backup["target"]
            assert vsc["parameters"]["backupCompression"] == backup["compression"]
    group_classes = of_kind(objs, "VolumeGroupSnapshotClass")
    assert len(group_classes) == (1 if values["volumeGroupSnapshotClass"]["create"] else 0)
    for vgsc in group_classes:
        assert vgsc["apiVersion"] == "groupsnapshot.storage.k8s.io/v1beta1"
        assert vgsc["driver"] == values["driverName"]
        assert vgsc["deletionPolicy"] == values["volumeGroupSnapshotClass"]["deletionPolicy"]
        default = vgsc["metadata"].get("annotations", {}).get("groupsnapshot.storage.kubernetes.io/is-default-class")
        assert default == ("true" if values["volumeGroupSnapshotClass"]["isDefault"] else None)
    # the node's csi-snapshotter serves group snapshots through the gate (no deprecated flag)
    for ds in of_kind(objs, "DaemonSet"):
        assert flag(container(ds, "csi-snapshotter"), "feature-gates") == "CSIVolumeGroupSnapshot=true"


BACKUP_CASES = [case for case in IDS if MATRIX[case].get("backup", {}).get("enabled")]


@pytest.mark.parametrize("case", BACKUP_CASES)
def test_backup_classes_name_the_secret_the_role_allows(case: str, rendered: dict[str, list[Obj]]) -> None:
    """The VolumeSnapshotClass's snapshotter secrets and every StorageClass's provisioner secret
    are the one Secret the node account may get (in the release namespace) and the backup
    container mounts; and strata's own parameter checks accept what the classes pass it."""
    from csi.services.requests import check_parameters, check_snapshot_parameters

    values = values_of(case)
    objs = rendered[case]
    secret = values["backup"]["registrySecret"]
    (binding,) = [b for b in of_kind(objs, "RoleBinding") if b["subjects"][0]["name"] == "strata-node"]
    role = one(objs, "Role", binding["roleRef"]["name"])
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "strata-system"
    assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": [secret],
                              "verbs": ["get"]}]
    assert binding["roleRef"]["kind"] == "Role"
    for ds in of_kind(objs, "DaemonSet"):
        pod = ds["spec"]["template"]["spec"]
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"],
                                        "namespace": "strata-system"}]
        mounted = [v["secret"]["secretName"] for v in pod["volumes"] if v["name"] == "backup-registry"]
        assert mounted == ([secret] if values["backup"]["sidecar"]["enabled"] else [])

    vsc = one(objs, "VolumeSnapshotClass", values["backup"]["volumeSnapshotClass"]["name"])
    params = vsc["parameters"]
    for kind in ("snapshotter", "snapshotter-list"):
        assert params[f"csi.storage.k8s.io/{kind}-secret-name"] == secret
        assert params[f"csi.storage.k8s.io/{kind}-secret-namespace"] == "strata-system"
    backup = check_snapshot_parameters(params, allow_backup=True)
    assert (backup.target, backup.compression) == (values["backup"]["target"], values["backup"]["compression"])
    classes = of_kind(objs, "StorageClass")
    assert classes
    for sc in classes:
        params = sc["parameters"]
        assert params["csi.storage.k8s.io/provisioner-secret-name"] == secret
        assert params["csi.storage.k8s.io/provisioner-secret-namespace"] == "strata-system"
        assert params["backupTarget"] == values["backup"]["target"]
        driver = params.get("layeredDriver", "vfs")
        assert check_parameters(params, driver)["backupTarget"] == values["backup"]["target"]


def test_backup_needs_a_target() -> None:
    with pytest.raises(helm.HelmError, match=r"backup\.target is required when backup\.enabled is true"):
        render({"backup": {"enabled": True}})
    # also when neither class is made: the StorageClasses still point restores at it
    with pytest.raises(helm.HelmError, match=r"backup\.target is required"):
        render({"backup": {"enabled": True, "volumeSnapshotClass": {"create": False}}})
    with pytest.raises(helm.HelmError, match="give the backup class another one"):
        render({"backup": {"enabled": True, "target": "oci://r.example/b", "volumeSnapshotClass": {"name": "strata"}}})


def test_backup_off_adds_nothing(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["default"]
    assert [b for b in of_kind(objs, "RoleBinding") if b["subjects"][0]["name"] == "strata-node"] == []
    assert not any(r.get("resourceNames") for o in of_kind(objs, "Role") for r in o["rules"])
    assert [o["metadata"]["name"] for o in of_kind(objs, "VolumeSnapshotClass")] == ["strata"]
    assert all("parameters" not in sc for sc in of_kind(objs, "StorageClass"))
    # a target alone does not turn backups on (an own peer Secret: the chart-made one is new each render)
    own = {"peers": {"tls": {"existingSecret": "peer"}}}
    assert objects({**own, "backup": {"target": "oci://registry.example.com/b"}}) == objects(own)


def test_metrics_and_service_monitor(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["everything-on"]
    services = {s["metadata"]["name"]: s for s in of_kind(objs, "Service")
                if s["metadata"]["name"].endswith("-metrics")}  # strata-snapshot-metadata serves gRPC, not metrics
    assert set(services) == {"strata-node-metrics", "strata-controller-metrics"}
    named_ports = {p["name"] for s in services.values() for p in s["spec"]["ports"]}
    container_ports = {p["name"] for o in objs if o["kind"] in ("DaemonSet", "Deployment")
                       for c in o["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
    assert named_ports <= container_ports
    monitor = one(objs, "ServiceMonitor")
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == named_ports
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert of_kind(rendered["default"], "ServiceMonitor") == []
    assert of_kind(rendered["no-expansion-no-metrics"], "Service") == []


def matches(pod_spec: Obj, node_labels: dict[str, str]) -> bool:
    """Whether a pod with this spec may run on a node with these labels (nodeSelector + required affinity)."""
    if any(node_labels.get(k) != v for k, v in pod_spec.get("nodeSelector", {}).items()):
        return False
    terms = pod_spec.get("affinity", {}).get("nodeAffinity", {}) \
        .get("requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms")
    if terms is None:
        return True

    def holds(expr: Obj) -> bool:
        present = expr["key"] in node_labels
        if expr["operator"] == "In":
            return present and node_labels[expr["key"]] in expr["values"]
        if expr["operator"] == "NotIn":
            return not present or node_labels[expr["key"]] not in expr["values"]
        raise AssertionError(f"unexpected operator {expr['operator']}")

    return any(all(holds(e) for e in term["matchExpressions"]) for term in terms)


def test_driver_groups_cover_every_node_exactly_once(rendered: dict[str, list[Obj]]) -> None:
    daemonsets = {d["metadata"]["name"]: d for d in of_kind(rendered["driver-groups"], "DaemonSet")}
    assert set(daemonsets) == {"strata-node", "strata-node-fast", "strata-node-thin"}
    drivers = {name: flag(container(d, "strata"), "driver") for name, d in daemonsets.items()}
    assert drivers == {"strata-node": "auto", "strata-node-fast": "btrfs", "strata-node-thin": "devicemapper"}
    nodes = {
        "plain": ({}, "strata-node"),
        "nvme": ({"disk": "nvme"}, "strata-node-fast"),
        "sata": ({"disk": "sata"}, "strata-node"),
        "thin-b": ({"pool": "thin", "zone": "b"}, "strata-node-thin"),
        "thin-a": ({"pool": "thin", "zone": "a"}, "strata-node"),  # only half of the thin selector
        "zone-b": ({"zone": "b"}, "strata-node"),
    }
    for node, (labels, owner) in nodes.items():
        running = [name for name, d in daemonsets.items() if matches(d["spec"]["template"]["spec"], labels)]
        assert running == [owner], (node, running)
    # Driver options: the thin group's own (its pool), none elsewhere (the default is []).
    storage_opts = {name: [a for a in container(d, "strata")["args"] if a.startswith("--storage-opt=")]
                    for name, d in daemonsets.items()}
    assert storage_opts == {"strata-node": [], "strata-node-fast": [],
                            "strata-node-thin": ["--storage-opt=dm.thinpooldev=/dev/mapper/vg-thinpool",
                                                 "--storage-opt=dm.fs=xfs"]}
    # The Node-label lookup is enabled only where the driver is auto.
    for name, d in daemonsets.items():
        env = {e["name"] for e in container(d, "strata")["env"]}
        assert ("STRATA_NODE_DRIVER_LABEL" in env) == (drivers[name] == "auto"), name
    # Selectors of different DaemonSets never overlap (each pod has exactly one owner).
    selectors = [tuple(sorted(d["spec"]["selector"]["matchLabels"].items())) for d in daemonsets.values()]
    assert len(set(selectors)) == len(selectors)


def test_notes_render() -> None:
    notes = render(GROUPED)["strata/templates/NOTES.txt"]
    assert "strata.csi.dev" in notes and "strata-node-fast (driver: btrfs)" in notes
    assert "kubectl label node NODE strata.csi.dev/driver=btrfs" in notes


def test_notes_say_how_to_get_an_image_while_the_default_is_in_place() -> None:
    """The default strata image is not published: NOTES tell how to build, push and set one."""
    notes = render({})["strata/templates/NOTES.txt"]
    assert "ghcr.io/strata-csi/strata:0.1.0" in notes and "not published" in notes
    for needed in ("buildah bud -t REGISTRY/strata:0.1.0 .", "podman build", "docker build", "buildah push",
                   "skopeo copy oci-archive:.cache/image/strata.oci.tar docker://REGISTRY/strata:0.1.0",
                   "--set images.strata.repository=REGISTRY/strata --set images.strata.tag=0.1.0"):
        assert needed in notes, needed
    own = render({"images": {"strata": {"repository": "registry.example/strata", "tag": "0.1.0"}}})
    assert "not published" not in own["strata/templates/NOTES.txt"]


def test_readme_documents_every_value() -> None:
    import yaml

    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    documented = {line.split("`")[1] for line in readme.splitlines() if line.startswith("| `")}

    def covered(path: str, value: object) -> bool:
        if path in documented:
            return True
        return isinstance(value, dict) and bool(value) and all(covered(f"{path}.{k}", v) for k, v in value.items())

    missing = [k for k, v in values.items() if not covered(k, v)]
    assert missing == [], f"values without a README row: {missing}"
    schema_keys = set(render_schema_keys())
    assert set(values) == schema_keys


def render_schema_keys() -> list[str]:
    import json

    return list(json.loads((CHART / "values.schema.json").read_text())["properties"])


def test_snapshot_metadata_sidecar_service_and_object_agree(rendered: dict[str, list[Obj]]) -> None:
    """The external-snapshot-metadata sidecar next to strata controller: its port, the Service
    backup clients dial, and the SnapshotMetadataService (address, audience, CA) name the same
    things, and its TLS Secret holds the certificate the sidecar is given."""
    objs = rendered["everything-on"]
    deployment = next(o for o in objs if o["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    sidecar = next(c for c in pod["containers"] if sidecar_of(c) == "csi-snapshot-metadata")
    port = next(p["containerPort"] for p in sidecar["ports"] if p["name"] == "snapshot-metadata")
    assert f"--port={port}" in sidecar["args"] and "--csi-address=/csi/csi.sock" in sidecar["args"]
    service = next(o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == "strata-snapshot-metadata")
    assert service["spec"]["ports"][0]["targetPort"] == "snapshot-metadata"
    cr = one(objs, "SnapshotMetadataService")
    assert cr["metadata"]["name"] == values_of("everything-on")["driverName"]
    assert cr["spec"]["address"] == f"strata-snapshot-metadata.{deployment['metadata']['namespace']}.svc:{port}"
    secret_name = next(v["secret"]["secretName"] for v in pod["volumes"] if v["name"] == "snapshot-metadata-tls")
    secret = next(o for o in objs if o["kind"] == "Secret" and o["metadata"]["name"] == secret_name)
    assert base64.b64decode(cr["spec"]["caCert"]) == base64.b64decode(secret["data"]["ca.crt"])
    assert of_kind(rendered["default"], "SnapshotMetadataService") == []
