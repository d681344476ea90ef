"""A local Mosquitto process configured by `tessera provision`: the demo's `--broker
mosquitto`, and the integration tests' real broker.

    provision(federation, out, run_as_user=getpass.getuser())
    with MosquittoProcess(federation, out, workdir) as broker:
        bundle.session_config("127.0.0.1", port=broker.mqtt_port)

The configuration and ACL are rendered from the federation (mutual TLS with the provisioned
certificates and revocation list, the per-member ACL) with paths inside ``workdir`` and free
loopback ports chosen at construction (a WebSockets listener only if the federation has
one); persistence lives in ``workdir`` too, so a restart (``broker.restart()``) keeps
sessions and queued messages, as in production, and re-reads the revocation list.
"""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from broker.provisioning.federation import Federation
from broker.provisioning.mosquitto_conf import BrokerFiles, render_acl, render_conf


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class MosquittoProcess:
    """Starts ``mosquitto -c <generated conf>`` with the provisioned broker files."""

    def __init__(self, federation: Federation, provisioned: Path, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "data").mkdir(exist_ok=True)
        self.mqtt_port = free_port()
        self.websockets_port = free_port() if federation.broker.websockets_port else None
        self.host = "127.0.0.1"
        broker_dir = Path(provisioned) / "broker"
        files = BrokerFiles(
            ca_file=broker_dir / "ca.pem",
            cert_file=broker_dir / "server.pem",
            key_file=broker_dir / "server.key",
            crl_file=broker_dir / "crl.pem",
            acl_file=self.workdir / "acl",
            persistence_dir=self.workdir / "data",
        )
        (self.workdir / "acl").write_text(render_acl(federation))
        self.conf_path = self.workdir / "mosquitto.conf"
        self.conf_path.write_text(
            render_conf(
                federation,
                files,
                mqtt_port=self.mqtt_port,
                websockets_port=self.websockets_port,
                bind_address="127.0.0.1",
                run_as_user=getpass.getuser(),
            )
        )
        self.log_path = self.workdir / "mosquitto.log"
        self._process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 10.0) -> MosquittoProcess:
        """Start the broker and wait until both listeners accept connections."""
        executable = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [executable, "-c", str(self.conf_path)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"mosquitto exited at start:\n{self.log()}")
            ports = (self.mqtt_port, self.websockets_port)
            if all(_accepts(self.host, p) for p in ports if p is not None):
                self.starts += 1
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen within {timeout} s:\n{self.log()}")

    def stop(self, graceful: bool = True) -> None:
        """SIGTERM (Mosquitto saves its persistence file) or SIGKILL, then reap."""
        if self._process is None:
            return
        if graceful:
            self._process.terminate()
        else:
            self._process.kill()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(10)
        self._process = None

    def restart(self) -> None:
        """Stop gracefully and start again on the same ports with the same persistence."""
        self.stop()
        self.start()

    def log(self) -> str:
        """The broker's log so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> MosquittoProcess:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop(graceful=False)


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False
