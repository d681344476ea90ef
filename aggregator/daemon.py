"""`tessera aggregator run`: the AggregatorService on a real broker, with health and metrics.

Start-up, in order, each step failing with a message that names the fix:

1. the configuration (`aggregator.config`), the startup bundle and its coordinator-signed
   roster; the manifest, verified against the bundle's pinned coordinator key, and checked
   to name the same members and keys as the roster (`broker.provisioning.member`, as for
   a node);
2. the study's terms: this aggregator's k and clip norm may be stricter than the study's,
   never looser; the model the study trains (`aggregator.setup`);
3. the private keys, then the state store: `store.recover()` aborts any round a crash left
   in flight and deletes its shares, so a restarted aggregator never resumes a round;
4. the HTTP endpoints (`/healthz`, `/readyz`: broker connected, keys and store loaded;
   `/metrics`), then the MQTT session, subscribed to what an aggregator reads.

Then messages go to `AggregatorService.on_message` on the session's dispatch thread and the
main thread calls `tick()` twice a second; both hold one lock, so the service sees one
event at a time. The leader also opens rounds: once every expected node is online (or
`round.start_wait_s` passed), then `round.pause_s` after each round ends, until the study's
(or the configuration's smaller) maximum number of rounds. Where the study requires a privacy
audit, every release waits for the participating sites' signed audit reports and the gate
(`aggregator.privacy_gate`); a hold goes into `state/audit.log` and aborts the round.
SIGTERM or SIGINT stops it cleanly; SIGKILL is what `store.recover()` is for.

A member can write only its own topics but as fast as it likes (issue 19, point 8): the
session drops a member's messages beyond its budget as they are read (`broker.intake`),
its transfers are held within per-member quotas (`broker.quotas`), and every 10 s the
daemon logs, audits and counts what it dropped, one line per member, while repeats of a
member's refused messages are logged once per interval (`RepeatLimiter`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter

from aggregator.config import AggregatorConfig
from aggregator.errors import BaseModelSpent
from aggregator.privacy_gate import AuditSetup
from aggregator.registry import Registry
from aggregator.rounds import Stage
from aggregator.service import AggregatorService, Outgoing, ServiceKeys
from aggregator.setup import StudySetup, load_study_setup
from aggregator.store import RESTART_REASON, Store
from broker import topics
from broker.chunking import DEFAULT_TRANSFER_TIMEOUT_S
from broker.service_link import (
    Endpoint,
    ServiceLink,
    endpoint_config,
    member_intake,
    run_until_signalled,
)
from tessera.crypto.sealing import load_hpke_key
from tessera.crypto.signing import load_private_key
from tessera.governance.audit import AuditLog
from tessera.limits import MAX_TRANSFER_BYTES
from tessera.observability.events import Event
from tessera.observability.http import HealthServer
from tessera.observability.logs import RepeatLimiter
from tessera.observability.metrics import ServiceMetrics

log = logging.getLogger("tessera.aggregator.daemon")
TICK_S = 0.5
# How often refusals of a member's messages are reported: one line and one audit entry per
# member per interval, however many messages it sent (issue 19, point 8).
INTAKE_REPORT_S = 10.0


class AggregatorDaemon:
    """One running aggregator: the service, its MQTT link, its HTTP endpoints."""

    def __init__(self, config: AggregatorConfig, setup: StudySetup) -> None:
        config = dataclasses.replace(config, architecture=setup.model.architecture)
        self.config, self.setup = config, setup
        keys = ServiceKeys(load_private_key(config.signing_key), load_hpke_key(config.hpke_key))
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(config.database_path, config.shares_dir)
        self.audit = AuditLog.open(config.layout.audit_log)
        self._audited: tuple[int, Stage] | None = None
        for study_id, number in self.store.recover():
            self.audit.append(
                "round-aborted", {"study_id": study_id, "round": number, "reason": RESTART_REASON}
            )
            log.warning(
                Event.ROUND_RECOVERED,
                extra={"fields": {"study": study_id, "round": number}},
            )
        genesis = setup.model.genesis()
        # The first ONNX export in a process takes seconds (the exporter's one-off set-up);
        # pay it now, not between a round's partial sums and its release.
        setup.model.export(genesis, 0)
        self.service = AggregatorService(
            config,
            keys,
            setup.roster,
            self.store,
            Registry(self.store, config.registry_dir),
            time.time,
            genesis=genesis,
            export_onnx=setup.model.export,
            terms=setup.terms,
            audit=AuditSetup(setup.manifest, self.audit),
        )
        self.metrics_registry = CollectorRegistry()
        self.metrics = ServiceMetrics(self.metrics_registry)
        self.rounds_ended = Counter(
            "tessera_aggregator_rounds",
            "Rounds this aggregator finished, by outcome.",
            ["outcome"],
            registry=self.metrics_registry,
        )
        latest = self.service.registry.latest(config.study_id)
        if latest is not None:
            self.metrics.set_model(latest.record.version, latest.record.model_hash)
        self.intake_dropped = Counter(
            "tessera_aggregator_intake_dropped",
            "Messages from members over their intake budget, acknowledged and dropped.",
            registry=self.metrics_registry,
        )
        session = endpoint_config(
            setup.bundle, Endpoint(config.broker.host, config.broker.port, config.broker.tls)
        )
        self.link = ServiceLink(
            session,
            spool_dir=config.layout.spool,
            on_wire=self._count_wire,
            intake=member_intake(session, MAX_TRANSFER_BYTES),
            # A stalled transfer is dropped well before the round it belongs to closes.
            transfer_timeout_s=min(DEFAULT_TRANSFER_TIMEOUT_S, config.round.collect_timeout_s / 2),
        )
        self.repeats = RepeatLimiter(INTAKE_REPORT_S)
        self._intake_reported = time.monotonic()
        self.health = HealthServer(
            config.http_port,
            self.metrics_registry,
            readiness={
                "broker": lambda: self.link.connected,
                "keys": lambda: True,
                "store": self._store_ok,
            },
        )
        self._lock = threading.Lock()
        self._online: set[str] = set()
        # Rounds already opened count against max_rounds after a restart too.
        self._opened = self.store.latest_round(config.study_id) or 0
        self._ended_at: float | None = None
        self._not_opened: str | None = None  # why the last try to open a round failed
        self._started = time.monotonic()
        self._seen_terminal: int | None = None

    # --- wiring ----------------------------------------------------------------------------

    def _count_wire(self, direction: str, count: int) -> None:
        self.metrics.add_wire_bytes("sent" if direction == "sent" else "received", count)

    def _store_ok(self) -> bool:
        self.store.integrity_check()
        return True

    def start(self) -> AggregatorDaemon:
        """Serve HTTP, subscribe, connect (in the background)."""
        self.repeats.install()
        self.health.start()
        fed, study, me = self.config.federation_id, self.config.study_id, self.config.aggregator_id
        for topic_filter in (
            topics.round_topic(fed, study),
            topics.shares_for_aggregator(fed, study, me),
            f"{topics.ROOT}/{fed}/{study}/received/+",
            topics.participants_topic(fed, study),
            topics.partials_for_aggregator(fed, study, me),
            topics.release_topic(fed, study),
            topics.audit_reports(fed, study),
        ):
            self.link.subscribe(topic_filter, self._on_payload)
        self.link.session.subscribe(f"{topics.ROOT}/{fed}/presence/+", self._on_presence)
        self.link.start()
        log.info(
            Event.AGGREGATOR_STARTED,
            extra={
                "fields": {
                    "aggregator": me,
                    "study": study,
                    "leader": self.config.is_leader,
                    "http_port": self.health.port,
                }
            },
        )
        return self

    def close(self) -> None:
        """Disconnect, stop serving, close the store and the audit log."""
        self.link.close()
        self.health.close()
        self.store.close()
        self.audit.close()
        self.repeats.uninstall()

    def _publish(self, outgoing: Iterable[Outgoing]) -> None:
        for out in outgoing:
            self.link.publish(out.topic, out.payload, retain=out.retain)

    def _on_payload(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self._publish(self.service.on_message(topic, payload))
            self._note_round_end()

    def _on_presence(self, topic: str, payload: bytes) -> None:
        try:
            client = topics.parse(topic).client
        except ValueError:
            return
        if client is None:
            return
        with self._lock:
            if payload == b"online":
                self._online.add(client)
            else:
                self._online.discard(client)

    # --- the main loop ---------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Tick and (leader) open rounds until `stop` is set."""
        while not stop.wait(TICK_S):
            self.metrics.set_broker_connected(self.link.connected)
            self._report_intake()
            with self._lock:
                self._publish(self.service.tick())
                self._note_round_end()
                if self.config.is_leader and self._ready_for_next_round():
                    try:
                        opened = self.service.open_round(
                            self.setup.roster_sites, available=set(self._online)
                        )
                    except BaseModelSpent as exc:
                        # A retry on a summed base waits for the nodes of that sum to return
                        # (tried again every tick, logged once per reason).
                        if str(exc) != self._not_opened:
                            self._not_opened = str(exc)
                            fields = {"reason": str(exc)}
                            log.error(Event.ROUND_NOT_OPENED, extra={"fields": fields})
                        continue
                    self._not_opened = None
                    self._opened += 1
                    self._publish(opened)
                    current = self.service.current
                    assert current is not None
                    log.info(
                        Event.ROUND_OPENED,
                        extra={
                            "fields": {
                                "round": current.state.round,
                                "algorithm": current.announcement.algorithm,
                                "expected": len(current.announcement.expected_nodes),
                            }
                        },
                    )

    def _report_intake(self) -> None:
        """Once per INTAKE_REPORT_S: one line, one audit entry and the counter for each
        member whose messages the intake gate dropped, and the repeats the log left out."""
        self.repeats.flush()
        now = time.monotonic()
        if self.link.intake is None or now - self._intake_reported < INTAKE_REPORT_S:
            return
        interval, self._intake_reported = now - self._intake_reported, now
        for sender, dropped in sorted(self.link.intake.drain().items()):
            self.intake_dropped.inc(dropped)
            fields = {"sender": sender, "dropped": dropped, "interval_s": round(interval, 1)}
            with self._lock:
                self.audit.append("intake-throttled", fields)
            log.warning(Event.INTAKE_THROTTLED, extra={"fields": fields})

    def _audit_progress(self) -> None:
        """Append the audit entries for what the round did since the last call: opened,
        participant set agreed, released (with any strategy switch), aborted."""
        current = self.service.current
        if current is None:
            return
        state, a = current.state, current.announcement
        seen_round, seen_stage = self._audited or (0, Stage.OPEN)
        if state.round != seen_round:
            seen_stage = Stage.OPEN
            self.audit.append("round-opened", {
                "study_id": a.study_id, "round": a.round, "leader": a.leader_id,
                "algorithm": a.algorithm, "expected": len(a.expected_nodes),
                "min_participants": a.min_participants,
            })  # fmt: skip
        order = list(Stage)
        if (
            state.participants is not None
            and order.index(seen_stage) < order.index(Stage.SUMMING)
            and state.stage is not Stage.ABORTED
        ):
            self.audit.append("participant-set", {
                "study_id": a.study_id, "round": a.round, "count": len(state.participants),
                "nodes": list(state.participants),
                # leader: nodes whose sealed statements differed between aggregators
                "left_out_statement_mismatch": list(current.left_out),
            })  # fmt: skip
        if state.stage is Stage.RELEASED and seen_stage is not Stage.RELEASED:
            latest = self.service.registry.latest(a.study_id)
            if latest is not None:
                self.audit.append("release", {
                    "study_id": a.study_id, "round": a.round, "version": latest.record.version,
                    "model_hash": latest.record.model_hash.hex(),
                })  # fmt: skip
                for switch in latest.card["strategy"]["switches"]:
                    self.audit.append("strategy-switch", {"study_id": a.study_id, **switch})
        if state.stage is Stage.ABORTED and seen_stage is not Stage.ABORTED:
            self.audit.append("round-aborted", {
                "study_id": a.study_id, "round": a.round, "reason": state.abort_reason,
            })  # fmt: skip
        self._audited = (state.round, state.stage)

    def _note_round_end(self) -> None:
        self._audit_progress()
        current = self.service.current
        if current is None or not current.state.stage.is_terminal:
            return
        if self._seen_terminal == current.state.round:
            return
        self._seen_terminal = current.state.round
        self._ended_at = time.monotonic()
        outcome = current.state.stage.name.lower()
        self.rounds_ended.labels(outcome=outcome).inc()
        latest = self.service.registry.latest(self.config.study_id)
        if latest is not None:
            self.metrics.set_model(latest.record.version, latest.record.model_hash)

    def _ready_for_next_round(self) -> bool:
        if not self.link.connected or self._opened >= self.setup.max_rounds:
            return False
        current = self.service.current
        if current is not None and not current.state.stage.is_terminal:
            return False
        now = time.monotonic()
        if self._ended_at is not None:
            return now - self._ended_at >= self.config.round.pause_s
        everyone = set(self.setup.roster_sites) | set(self.setup.roster.aggregator_ids)
        everyone.discard(self.config.aggregator_id)
        waited = now - self._started >= self.config.round.start_wait_s
        return waited or everyone <= self._online


def run(config: AggregatorConfig) -> int:
    """Start the daemon and run it until SIGTERM/SIGINT; the exit status."""
    setup = load_study_setup(config)
    return run_until_signalled(AggregatorDaemon(config, setup).start(), Event.AGGREGATOR_STOPPED)
