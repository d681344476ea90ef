"""The inference endpoint against hostile clients, with real clients (curl, openssl s_client,
raw sockets) against a real `tessera node serve` process: TLS only once TLS is on (AEAD
suites, TLS 1.2 or later), a bearer token (401 without it), mutual TLS when a client CA is
set, a bounded number of worker threads under a flood of silent connections, loopback by
default, and no start on another address without TLS and a token."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from node.inference.http import ServeConfig, ServerTLS
from tessera.errors import ConfigError
from tests.support.dicom_net import tls_files
from tests.support.models import export_model, pydicom_file, small_model

CURL_TIMEOUT = "30"  # seconds: a hang guard for each curl, never a measurement


@dataclass(frozen=True)
class Served:
    """One running `tessera node serve` and what its clients need."""

    process: subprocess.Popen[bytes]
    port: int
    token: str
    pki: dict[str, Path]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    """curl printing the HTTP status last; never raises on a failed transfer."""
    command = ["curl", "-sS", "--max-time", CURL_TIMEOUT, "-w", "\n%{http_code}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def status_and_body(result: subprocess.CompletedProcess[str]) -> tuple[int, str]:
    body, _, status = result.stdout.rpartition("\n")
    return int(status), body


@pytest.fixture(scope="module")
def onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real model's ONNX file, exported once."""
    model, spec = small_model(0)
    path = tmp_path_factory.mktemp("model") / "model.onnx"
    path.write_bytes(export_model(model, "1", spec))
    return path


def serve(
    onnx: Path, tmp: Path, *extra: str, host: str | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    """Start `tessera node serve` with the model; returns the process and its port."""
    port = free_port()
    command = [sys.executable, "-m", "tessera.cli", "node", "serve", "--model", str(onnx),
               "--state", str(tmp / "state"), "--port", str(port), "--watch", "60",
               *extra]  # fmt: skip
    if host is not None:
        command += ["--host", host]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE), port


def wait_until_listening(process: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + 120  # a hang guard: the child imports onnxruntime
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1].decode()[-2000:]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("tessera node serve never listened")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
    process.communicate()


def token_file(folder: Path, token: str) -> Path:
    path = folder / "token.sha256"
    path.write_text(hashlib.sha256(token.encode()).hexdigest() + "\n")
    return path


@pytest.fixture(scope="module")
def served(onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """TLS and a token, on loopback, with four workers."""
    tmp = tmp_path_factory.mktemp("served")
    pki = tls_files(tmp / "pki")
    token = secrets.token_urlsafe(32)
    process, port = serve(onnx, tmp, "--tls-cert", str(pki["server"]), "--tls-key",
                          str(pki["server_key"]), "--token-sha256-file",
                          str(token_file(tmp, token)), "--max-workers", "4")  # fmt: skip
    wait_until_listening(process, port)
    yield Served(process, port, token, pki)
    stop(process)


def test_plain_http_is_refused_when_tls_is_on(served: Served) -> None:
    plain = curl("-H", f"Authorization: Bearer {served.token}",
                 f"http://127.0.0.1:{served.port}/v1/model")  # fmt: skip
    assert plain.returncode != 0 and status_and_body(plain)[0] == 0, plain
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as raw:
        raw.sendall(b"GET /v1/model HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            answer = raw.recv(4096)
        except ConnectionResetError:  # closed with the request unread
            answer = b""
    assert not answer.startswith(b"HTTP/")  # a TLS alert or nothing: never an HTTP answer


def test_a_missing_or_wrong_token_gets_401_and_the_right_one_an_answer(served: Served) -> None:
    trust = ("--cacert", str(served.pki["ca"]))
    dicom = str(pydicom_file("MR_small.dcm"))
    post = ("--data-binary", f"@{dicom}", "-H", "Content-Type: application/dicom")
    for headers in ((), ("-H", "Authorization: Bearer wrong-token"),
                    ("-H", f"Authorization: Basic {served.token}")):  # fmt: skip
        for request in ((f"{served.url}/v1/model",), (*post, f"{served.url}/v1/infer")):
            status, body = status_and_body(curl(*trust, *headers, *request))
            assert status == 401 and json.loads(body)["error"] == "unauthorized", body
    headers = ("-H", f"Authorization: Bearer {served.token}")
    status, body = status_and_body(curl(*trust, *headers, *post, f"{served.url}/v1/infer"))
    assert status == 200 and set(json.loads(body)["probabilities"]) == {"absent", "present"}
    refused = curl(*trust, "-D", "-", "-o", os.devnull, f"{served.url}/v1/model")
    assert "www-authenticate: bearer" in refused.stdout.lower()


@pytest.mark.parametrize(
    ("args", "accepted"),
    [
        (("-tls1_3",), True),
        (("-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"), True),
        (("-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA"), False),  # CBC with SHA-1
        (("-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"), False),
    ],
)
def test_only_aead_suites_on_tls_1_2_or_later(
    served: Served, args: tuple[str, ...], accepted: bool
) -> None:
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{served.port}", "-CAfile",
         str(served.pki["ca"]), "-verify_return_error", *args],
        input="", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    handshake = result.returncode == 0 and "Verify return code: 0 (ok)" in result.stdout
    assert handshake == accepted, result.stdout[-1500:] + result.stderr[-1500:]


def threads_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(x for x in status.splitlines() if x.startswith("Threads:")).split()[1])


def idle_tls_connections(served: Served, count: int) -> tuple[list[ssl.SSLSocket], int]:
    """Open `count` TLS connections that never send a request; (the open ones, refused)."""
    context = ssl.create_default_context(cafile=str(served.pki["ca"]))
    opened, refused = [], 0
    for _ in range(count):
        raw = socket.create_connection(("127.0.0.1", served.port), timeout=30)
        try:
            opened.append(context.wrap_socket(raw, server_hostname="127.0.0.1"))
        except OSError:  # closed at once: every worker is busy
            raw.close()
            refused += 1
    return opened, refused


def test_a_flood_of_idle_connections_never_grows_threads_past_the_bound(
    served: Served,
) -> None:
    pid, workers = served.process.pid, 4
    trust = ("--cacert", str(served.pki["ca"]))
    auth = ("-H", f"Authorization: Bearer {served.token}")
    assert status_and_body(curl(*trust, *auth, f"{served.url}/v1/model"))[0] == 200
    before = threads_of(pid)
    flood, refused = idle_tls_connections(served, 40)
    try:
        assert len(flood) <= workers and refused >= 40 - workers
        assert threads_of(pid) <= before + workers
        # A real client behind them is refused at once instead of queueing a thread.
        assert curl(*trust, *auth, f"{served.url}/v1/model").returncode != 0
        assert threads_of(pid) <= before + workers
    finally:
        for connection in flood:
            connection.close()
    deadline = time.monotonic() + 120  # a hang guard: the workers see the peers close
    while status_and_body(curl(*trust, *auth, f"{served.url}/v1/model"))[0] != 200:
        assert time.monotonic() < deadline, "the server never recovered from the flood"
        time.sleep(0.5)


def test_mutual_tls_refuses_a_client_without_a_certificate_from_its_ca(
    onnx: Path, tmp_path: Path
) -> None:
    pki, foreign = tls_files(tmp_path / "pki"), tls_files(tmp_path / "foreign")
    token = secrets.token_urlsafe(32)
    process, port = serve(onnx, tmp_path, "--tls-cert", str(pki["server"]), "--tls-key",
                          str(pki["server_key"]), "--tls-client-ca", str(pki["ca"]),
                          "--token-sha256-file", str(token_file(tmp_path, token)))  # fmt: skip
    try:
        wait_until_listening(process, port)
        base = ("--cacert", str(pki["ca"]), "-H", f"Authorization: Bearer {token}")
        url = f"https://127.0.0.1:{port}/v1/model"
        assert curl(*base, url).returncode != 0  # no client certificate
        assert curl(*base, "--cert", str(foreign["client"]), "--key",
                    str(foreign["client_key"]), url).returncode != 0  # fmt: skip
        status, body = status_and_body(
            curl(*base, "--cert", str(pki["client"]), "--key", str(pki["client_key"]), url)
        )
        assert status == 200 and json.loads(body)["model_version"] == "1"
    finally:
        stop(process)


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a socket listening on `port`, from the kernel's table."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, _, hex_port = local.partition(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def test_serve_listens_on_loopback_by_default(onnx: Path, tmp_path: Path) -> None:
    process, port = serve(onnx, tmp_path)
    try:
        wait_until_listening(process, port)
        assert listening_addresses(port) == {"127.0.0.1"}
    finally:
        stop(process)


def test_serve_refuses_another_address_without_tls_and_a_token(onnx: Path, tmp_path: Path) -> None:
    process, _ = serve(onnx, tmp_path, host="0.0.0.0")
    try:
        _, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        stop(process)
        raise AssertionError("serve started on 0.0.0.0 without TLS or a token") from None
    assert process.returncode == 2, err.decode()[-2000:]
    assert "--tls-cert" in err.decode() and "--token-sha256-file" in err.decode()
    # Either alone is not enough either.
    tls = ServerTLS(tmp_path / "server.pem", tmp_path / "server.key")
    for partial in ({"tls": tls}, {"token_sha256": bytes(32)}):
        with pytest.raises(ConfigError, match="needs TLS and a client credential"):
            ServeConfig("10.0.5.20", **partial)
    assert ServeConfig("10.0.5.20", tls=tls, token_sha256=bytes(32)).host == "10.0.5.20"
