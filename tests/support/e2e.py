"""A live federation for end-to-end tests: real Mosquitto (mutual TLS, generated ACL) and
real `tessera aggregator run` / `tessera node run` processes.

    with LiveFederation(tmp_path, spec) as live:
        live.start_all()
        live.wait_for("agg-uni", Event.MODEL_RELEASED, round=1)
        live.kill("site-d")                     # SIGKILL, the whole process group

Every daemon writes JSON lines (one event per line; the "event" key is its name, a member of
`tessera.observability.events.Event`) to `<root>/logs/<member>.<run>.log`; a restart opens a
new run file. `wait_for` polls those files, never the wall clock of the daemons, and fails
with the tail of the member's log (and says so when the process died). `close()` (also on
`__exit__`) ends every process it started: SIGTERM, then SIGKILL of its process group; then
the broker.

Small by design: 32-pixel synthetic DICOM, a few dozen images per site, one local epoch,
one torch thread per process, so that a whole federation runs on a two-core machine.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from broker.local_mosquitto import MosquittoProcess
from broker.provisioning.bundle import load_bundle
from node.demo.federation import FederationSpec, PreparedFederation, prepare_federation
from node.privacy.ledger import ledger_path, recorded_epsilon
from node.round.releases import ModelStore
from node.synth.sites import SynthConfig, generate
from tessera.crypto.signing import public_key_bytes
from tessera.files import atomic_write
from tessera.governance.audit import epsilon_by_study, read_entries
from tessera.observability.events import Event

REPO = Path(__file__).resolve().parents[2]
TESSERA = Path(sys.executable).parent / "tessera"
LogEntry = dict[str, Any]  # one JSON line of a member's log


class LiveFederation:
    """One provisioned federation with its broker and member processes (module docstring)."""

    def __init__(
        self,
        root: Path,
        spec: FederationSpec,
        *,
        images_per_site: int = 60,
        synth_seed: int = 1,
        synth: Mapping[str, Any] | None = None,
    ) -> None:
        """`synth` overrides `SynthConfig` fields (label skew, modality, lesions, test split)."""
        self.root = Path(root)
        self.spec = spec
        folder = self.root / "synth"
        terms: dict[str, Any] = {"skew": 0.6, "size": spec.image_size, **(synth or {})}
        generate(
            SynthConfig(
                out=folder,
                sites=len(spec.sites),
                seed=synth_seed,
                images_per_site=images_per_site,
                **terms,
            )
        )
        dicom = {s: folder / f"site-{i:02d}" / "dicom" for i, s in enumerate(spec.sites)}
        labels = {s: folder / f"site-{i:02d}" / "labels.csv" for i, s in enumerate(spec.sites)}
        self.prepared: PreparedFederation = prepare_federation(
            self.root / "federation", spec, dicom=dicom, labels_csv=labels
        )
        self.broker = MosquittoProcess(
            self.prepared.federation, self.prepared.provisioned, self.root / "mosquitto"
        )
        self.logs_dir = self.root / "logs"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.runs: dict[str, list[Path]] = {}

    # --- life cycle ------------------------------------------------------------------------

    def __enter__(self) -> LiveFederation:
        self.broker.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def is_aggregator(self, member: str) -> bool:
        """Whether `member` is one of the spec's aggregators."""
        return member in self.spec.aggregators

    def start(self, member: str, **env: str) -> subprocess.Popen[bytes]:
        """Start `tessera <aggregator|node> run` for `member` (a new log run); `env` adds or
        overrides environment variables (e.g. TESSERA_TRAINING_BATCH_SIZE)."""
        if member in self.processes and self.processes[member].poll() is None:
            raise AssertionError(f"{member} is already running")
        kind = "aggregator" if self.is_aggregator(member) else "node"
        runs = self.runs.setdefault(member, [])
        log_path = self.logs_dir / f"{member}.{len(runs) + 1}.log"
        runs.append(log_path)
        environment = {
            **os.environ,
            "TESSERA_BROKER_PORT": str(self.broker.mqtt_port),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [str(TESSERA), kind, "run", "--config", str(self.prepared.config(member))],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
                cwd=REPO,
                start_new_session=True,  # its own process group: kill() reaches any children
            )
        self.processes[member] = process
        return process

    def start_all(self, members: Iterable[str] | None = None) -> None:
        """Start `members` (default: every aggregator and every site), aggregators first."""
        chosen = (
            list(members) if members is not None else [*self.spec.aggregators, *self.spec.sites]
        )
        for member in chosen:
            self.start(member)

    def running(self, member: str) -> bool:
        """Whether `member`'s latest process is alive."""
        process = self.processes.get(member)
        return process is not None and process.poll() is None

    def kill(self, member: str) -> None:
        """SIGKILL `member`'s process group and reap it."""
        process = self.processes[member]
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)

    def stop(self, member: str, timeout: float = 40.0) -> int | None:
        """SIGTERM `member` (a clean stop); SIGKILL if it is still alive after `timeout`.
        Returns the exit status, or None when it had to be killed."""
        process = self.processes[member]
        if process.poll() is not None:
            return process.returncode
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(member)
            return None

    def stop_all(self, timeout: float = 40.0) -> None:
        """SIGTERM every running member at once, wait, SIGKILL what is left."""
        alive = [m for m, p in self.processes.items() if p.poll() is None]
        for member in alive:
            self.processes[member].send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for member in alive:
            try:
                self.processes[member].wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill(member)

    def close(self) -> None:
        """End every process this federation started, then the broker."""
        try:
            self.stop_all(timeout=20.0)
        finally:
            for process in self.processes.values():  # whatever survived, by group id
                if process.poll() is None:
                    try:
                        os.killpg(process.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    process.wait(30)
            self.broker.stop(graceful=False)

    # --- logs ------------------------------------------------------------------------------

    def events(self, member: str, run: int | None = None) -> list[LogEntry]:
        """The JSON events of one run of `member` (default: every run, in order)."""
        paths = self.runs.get(member, [])
        chosen = paths if run is None else [paths[run]]
        found: list[LogEntry] = []
        for path in chosen:
            if not path.exists():
                continue
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    try:
                        found.append(json.loads(line))
                    except ValueError:
                        continue  # a line being written
        return found

    def find(
        self, member: str, event: Event, run: int | None = None, **fields: Any
    ) -> list[LogEntry]:
        """Events named `event` of `member` whose fields equal `fields`."""
        return [
            e
            for e in self.events(member, run)
            if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
        ]

    def log_tail(self, member: str, lines: int = 40) -> str:
        """The last lines of `member`'s latest run, for failure messages."""
        paths = self.runs.get(member)
        if not paths or not paths[-1].exists():
            return f"({member} has no log)"
        return "\n".join(paths[-1].read_text(errors="replace").splitlines()[-lines:])

    def wait_until(
        self,
        condition: Callable[[], Any],
        what: str,
        timeout: float,
        watch: Iterable[str] = (),
        interval: float = 0.1,
    ) -> Any:
        """Poll `condition` until it returns something truthy; fail after `timeout` seconds
        (or as soon as a member in `watch` exits), with the watched members' log tails."""
        deadline = time.monotonic() + timeout
        watched = list(watch)
        while True:
            value = condition()
            if value:
                return value
            dead = [m for m in watched if not self.running(m)]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"not within {timeout:.0f} s"
                tails = "\n".join(f"--- {m}\n{self.log_tail(m)}" for m in watched)
                raise AssertionError(f"waiting for {what}: {why}\n{tails}")
            time.sleep(interval)

    def wait_for(
        self,
        member: str,
        event: Event,
        timeout: float = 120.0,
        run: int | None = None,
        **fields: Any,
    ) -> LogEntry:
        """The first `event` of `member` with `fields`, waiting for it (see wait_until)."""

        def found() -> LogEntry | None:
            hits = self.find(member, event, run, **fields)
            return hits[0] if hits else None

        detail = ", ".join(f"{k}={v!r}" for k, v in fields.items())
        return self.wait_until(found, f"{member} {event} {detail}", timeout, watch=[member])

    # --- state folders ---------------------------------------------------------------------

    def state(self, member: str) -> Path:
        """`member`'s state folder."""
        return self.prepared.state(member)

    def node_versions(self, site: str) -> list[int]:
        """The model versions a node's store has accepted (read-only use of its store)."""
        store = ModelStore(self.state(site), self.spec.federation_id, self.spec.study_id)
        return [m.version for m in store.versions()]

    def write_policy(self, site: str, *, paused: bool) -> Path:
        """Write (atomically) the site's policy file; start the node with
        `TESSERA_POLICY=<path>`. The node re-reads it at every RoundOpen."""
        bundle = load_bundle(self.prepared.bundle(site))
        key = base64.b64encode(public_key_bytes(bundle.coordinator_key)).decode("ascii")
        text = f'site_id = "{site}"\ncoordinator_key = "{key}"\npaused = {str(paused).lower()}\n'
        path = self.root / "policies" / f"{site}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, text.encode("utf-8"))
        return path

    def held_shares(self, aggregator: str, round_number: int) -> list[str]:
        """Node ids the aggregator's store holds shares from (read-only, while it runs)."""
        path = self.state(aggregator) / "aggregator.sqlite3"
        if not path.exists():
            return []
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
            try:
                rows = db.execute(
                    "SELECT node_id FROM shares WHERE study_id=? AND round=?",
                    (self.spec.study_id, round_number),
                ).fetchall()
            finally:
                db.close()
        except sqlite3.Error:
            return []  # not created yet, or locked for a moment
        return sorted(row[0] for row in rows)


def epsilon_agreement(state_dir: Path, study_id: str) -> tuple[float, float]:
    """(the privacy ledger's composed total, the sum of the audit log's epsilon-spent
    entries) of one node's state folder."""
    recorded = recorded_epsilon(ledger_path(state_dir, study_id), study_id)
    ledger_total = 0.0 if recorded is None else recorded[0]
    audit_total = epsilon_by_study(read_entries(state_dir / "audit.log")).get(study_id, 0.0)
    return ledger_total, audit_total


def audit_entries(state_dir: Path, kind: str) -> list[Mapping[str, Any]]:
    """The fields of every `kind` entry in a node's audit log, oldest first."""
    return [e.fields for e in read_entries(state_dir / "audit.log") if e.kind == kind]
