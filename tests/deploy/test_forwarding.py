"""Start-up of the forwarding pieces, with real processes: what they refuse before serving.

Forwarding itself (``strata controller`` -> the owner node's peer listener, TLS and
ServiceAccount tokens, the owner unreachable, a moved node) runs end to end between network
namespaces in ``tests/peers/test_channel.py``; the old plain-TCP forward listener and its
shared token are gone, and these tests check their flags are refused.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "peers"))

from peer_pki import make_pki  # noqa: E402


def strata(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "csi.cli", *args], capture_output=True, text=True, timeout=60)


def test_controller_refuses_to_start_without_a_usable_ca_or_token(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.t.s\n")
    (tmp_path / "empty").write_text("\n")
    cases = {
        "no-token": (pki.ca, tmp_path / "missing", "cannot read token file"),
        "empty-token": (pki.ca, tmp_path / "empty", "is empty"),
        "no-ca": (tmp_path / "missing-ca", token, "cannot read CA bundle"),
        "not-a-ca": (token, token, "no PEM certificate"),
    }
    for name, (ca, token_file, message) in cases.items():
        sock = tmp_path / f"{name}.sock"
        done = strata("controller", f"--endpoint=unix://{sock}", f"--tls-ca={ca}", f"--token-file={token_file}")
        assert done.returncode == 1, (name, done.stderr)
        assert message in done.stderr, (name, done.stderr)
        assert not sock.exists(), name


def test_serve_refuses_a_bad_peer_listener_and_leaves_no_socket(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    cases = {
        "missing-cert": (["--peer-listen=127.0.0.1:0", f"--tls-cert={tmp_path}/none.crt", f"--tls-key={pki.key}"],
                         "cannot read TLS certificate"),
        "bad-address": (["--peer-listen=unix:///tmp/x.sock", f"--tls-cert={pki.cert}", f"--tls-key={pki.key}"],
                        "HOST:PORT"),
        "missing-ca": ([f"--tls-ca={tmp_path}/none.crt", f"--token-file={pki.ca}", "--peer-port=9839"],
                       "cannot read CA bundle"),
    }
    for name, (flags, message) in cases.items():
        sock = tmp_path / f"{name}.sock"
        done = strata("serve", f"--endpoint=unix://{sock}", f"--root={tmp_path}/{name}-root", "--driver=vfs", *flags)
        assert done.returncode == 1, (name, done.stderr)
        assert message in done.stderr, (name, done.stderr)
        assert not sock.exists(), name


@pytest.mark.parametrize("flags,message", [
    (["--peer-listen=127.0.0.1:9839"], "needs --tls-cert and --tls-key"),
    (["--tls-ca=/x"], "needs both --tls-ca and --token-file"),
    (["--peer-account=strata"], "NAMESPACE/NAME"),
    (["--forward-listen=127.0.0.1:9839"], "unrecognized arguments"),
    (["--forward-token-file=/x"], "unrecognized arguments"),
])
def test_serve_flag_errors(tmp_path: Path, flags: list[str], message: str) -> None:
    done = strata("serve", f"--root={tmp_path}", *flags)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_controller_no_longer_takes_a_shared_token(tmp_path: Path) -> None:
    done = strata("controller", f"--endpoint=unix://{tmp_path}/c.sock", "--tls-ca=/x", "--token-file=/x",
                  "--forward-token-file=/x")
    assert done.returncode == 2 and "unrecognized arguments: --forward-token-file" in done.stderr, done.stderr
