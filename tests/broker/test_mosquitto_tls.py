"""Issue 20, point 4: the broker negotiates only AEAD cipher suites, on both listeners.

`openssl s_client` offers one TLS 1.2 suite at a time, every ECDSA suite this OpenSSL
knows (the broker's certificate is ECDSA), with a valid client certificate: only the AEAD
ones (AES-GCM, ChaCha20-Poly1305) may be accepted; CBC with SHA-1 or SHA-2 may not. TLS 1.3
(AEAD by definition) is accepted.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from support.mosquitto import MosquittoProcess

OPENSSL = shutil.which("openssl") or "openssl"
AEAD_MARKERS = ("-GCM-", "-CHACHA20-POLY1305")


def ecdsa_tls12_suites() -> list[str]:
    """Every TLS 1.2 suite with ECDSA authentication that the local OpenSSL offers."""
    listed = subprocess.run(
        [OPENSSL, "ciphers", "-s", "-tls1_2", "aECDSA"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    return [s for s in listed.strip().split(":") if s and not s.startswith("TLS_")]


def handshake(port: int, bundle: Path, *options: str) -> str | None:
    """The suite the broker negotiated with `openssl s_client options`, None if it refused."""
    result = subprocess.run(
        [
            OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-brief",
            "-CAfile", str(bundle / "ca.pem"), "-cert", str(bundle / "client.pem"),
            "-key", str(bundle / "client.key"), *options,
        ],
        input=b"", capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    output = (result.stdout + result.stderr).decode(errors="replace")
    if result.returncode != 0 or "CONNECTION ESTABLISHED" not in output:
        return None
    return output.split("Ciphersuite: ", 1)[1].split()[0]


@pytest.mark.parametrize("listener", ["mqtt", "websockets"])
def test_only_aead_suites_are_negotiated(
    mosquitto: MosquittoProcess, provisioned: Path, listener: str
) -> None:
    port = mosquitto.mqtt_port if listener == "mqtt" else mosquitto.websockets_port
    assert port is not None
    bundle = provisioned / "bundles/site-a"
    suites = ecdsa_tls12_suites()
    assert "ECDHE-ECDSA-AES128-SHA" in suites  # the CBC-SHA1 suite issue 20 negotiated
    accepted = {s for s in suites if handshake(port, bundle, "-tls1_2", "-cipher", s) == s}
    assert accepted, "no TLS 1.2 suite at all was accepted"
    assert {s for s in accepted if not any(m in s for m in AEAD_MARKERS)} == set()
    assert handshake(port, bundle, "-tls1_3") is not None
