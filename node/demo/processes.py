"""The demo's process supervision: the broker, one OS process per member, and their stop.

Each aggregator and node is a real `tessera <kind> run` process in its own session, its
stdout and stderr appended to its log file (the JSON lines `node.demo.progress` follows).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from node.demo.federation import PreparedFederation


def start_broker(
    kind: str, prepared: PreparedFederation, out: Path
) -> tuple[str, int, Callable[[], None]]:
    """Start the demo's broker; (what it is, its port, how to stop it)."""
    if kind == "mosquitto":
        from broker.local_mosquitto import MosquittoProcess

        mosquitto = MosquittoProcess(prepared.federation, prepared.provisioned, out / "broker")
        mosquitto.start()
        return "Mosquitto (mutual TLS, ACL)", mosquitto.mqtt_port, mosquitto.stop
    from broker.devbroker import DevBroker

    dev = DevBroker().start()
    return "embedded development broker (plaintext, loopback only)", dev.port, dev.stop


def spawn_member(
    kind: str, config: Path, log: Path, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """Start `tessera <kind> run --config <config>`, its output appended to `log`."""
    with log.open("ab") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "tessera.cli", kind, "run", "--config", str(config)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def stop_members(processes: dict[str, subprocess.Popen[bytes]]) -> None:
    """SIGTERM every member still running, then wait; kill any that ignores it for 20 s."""
    for process in processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes.values():
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
