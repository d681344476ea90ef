"""`tessera aggregator run`: the AggregatorService on a real broker, with health and metrics.

Start-up, in order, each step failing with a message that names the fix:

1. the configuration (`aggregator.config`), the startup bundle and its coordinator-signed
   roster; the manifest, verified against the bundle's pinned coordinator key, and checked
   to name the same members and keys as the roster (`broker.provisioning.member`, as for
   a node);
2. the study's terms: this aggregator's k and clip norm may be stricter than the study's,
   never looser; the model the study trains (`aggregator.setup`); the leader's weight cap
   and fraction bits must represent an update of that model (`aggregator.leader`:
   `check_round_settings`);
3. the private keys, then the state store, refused when it is behind the registry or the
   audit log (lost, emptied or restored from an older backup: `aggregator.state_history`
   names the fix, `tessera aggregator rebuild-state`); `store.recover()` aborts any round a
   crash left in flight and deletes its shares, so a restarted aggregator never resumes a
   round;
4. the HTTP endpoints on `http_host` (`/healthz`; `/readyz` with the checks
   `READINESS_CHECKS`: `broker` connected, `keys` on disk the roster's, `store` intact,
   `disk` not full; `/metrics`), then the MQTT session, subscribed to what an aggregator
   reads.

Then messages go to `AggregatorService.on_message` on the session's dispatch thread and the
main thread calls `tick()` twice a second; both hold one lock, so the service sees one
event at a time. What a step returns is posted to the link's outbox under that lock (so it
goes out in the service's order) and sent by the outbox's own thread: no step ever waits
for the broker. During a broker outage the ticks go on (a round past its timeouts aborts),
`/readyz` fails its "broker" check, and what was posted goes out once the session is back
(`broker.outbox`); the leader opens no round while disconnected or while what it posted
is still going out. The leader also opens rounds: once every expected node is online (or
`round.start_wait_s` passed), then `round.pause_s` after each round ends, until the study's
(or the configuration's smaller) maximum number of rounds. Where the study requires a privacy
audit, every release waits for the participating sites' signed audit reports and the gate
(`aggregator.privacy_gate`); a hold goes into `state/audit.log` and aborts the round.
SIGTERM or SIGINT stops it cleanly; SIGKILL is what `store.recover()` is for.

A full disk (`tessera.files.DiskFull`, at start-up or at any write) stops nothing but the
work: the daemon stays up, logs `disk-full` (the folder, the space needed, the space free),
answers `/readyz` with 503 and that sentence, and drops what arrives. Once enough space is
free again it starts over as after a restart (step 3: the round in flight is aborted) and
the leader opens the next round. The leader also opens no round while less than about one
round's files is free, so that no node spends epsilon on a round it could not finish.

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
from aggregator.leader import check_round_settings
from aggregator.privacy_gate import AuditSetup
from aggregator.registry import Registry
from aggregator.rounds import Stage
from aggregator.service import AggregatorService, Outgoing, ServiceKeys
from aggregator.setup import StudySetup, load_study_setup
from aggregator.state_history import open_checked_store
from aggregator.store import DISK_FULL_REASON, RESTART_REASON, Store
from broker import topics
from broker.chunking import DEFAULT_TRANSFER_TIMEOUT_S, prepare_spool_dir
from broker.provisioning.key_check import check_member_keys
from broker.service_link import (
    Endpoint,
    ServiceLink,
    endpoint_config,
    member_intake,
    run_until_signalled,
)
from broker.session_config import TlsFiles
from tessera.crypto.sealing import load_hpke_key
from tessera.crypto.signing import load_private_key
from tessera.errors import DiskFull
from tessera.files import DiskWatch, disk_full_error, free_bytes
from tessera.governance.audit import AuditLog, open_service_audit
from tessera.limits import DISK_RESERVE_BYTES, MAX_TRANSFER_BYTES
from tessera.observability.events import Event
from tessera.observability.http import HealthServer
from tessera.observability.logs import RepeatLimiter
from tessera.observability.metrics import ServiceMetrics

log = logging.getLogger("tessera.aggregator.daemon")
TICK_S = 0.5
# How often refusals of a member's messages are reported: one line and one audit entry per
# member per interval, however many messages it sent (issue 19, point 8).
INTAKE_REPORT_S = 10.0


# The /readyz checks, in the order it names failing ones (the README's table lists them).
READINESS_CHECKS = ("broker", "keys", "store", "disk")


class AggregatorDaemon:
    """One running aggregator: the service, its MQTT link, its HTTP endpoints."""

    def __init__(self, config: AggregatorConfig, setup: StudySetup) -> None:
        config = dataclasses.replace(config, architecture=setup.model.architecture)
        self.config, self.setup = config, setup
        self._keys = ServiceKeys(
            load_private_key(config.signing_key), load_hpke_key(config.hpke_key)
        )
        config.state_dir.mkdir(parents=True, exist_ok=True)
        spool = prepare_spool_dir(config.layout.spool)  # before anything is received
        self._genesis = setup.model.genesis()
        if config.is_leader:  # terms every other party would refuse: say so now
            check_round_settings(config.round, sum(a.size for a in self._genesis.values()))
        # The first ONNX export in a process takes seconds (the exporter's one-off set-up);
        # pay it now, not between a round's partial sums and its release.
        setup.model.export(self._genesis, 0)
        # Resume after a full disk only with room for about one round's files: a release's
        # weights, ONNX export, signed release (both again) and optimiser state.
        weights = sum(array.nbytes for array in self._genesis.values())
        self.disk = DiskWatch(reserve=DISK_RESERVE_BYTES + 8 * weights)
        self.metrics_registry = CollectorRegistry()
        self.metrics = ServiceMetrics(self.metrics_registry)
        self.rounds_ended = Counter(
            "tessera_aggregator_rounds",
            "Rounds this aggregator finished, by outcome.",
            ["outcome"],
            registry=self.metrics_registry,
        )
        self.intake_dropped = Counter(
            "tessera_aggregator_intake_dropped",
            "Messages from members over their intake budget, acknowledged and dropped.",
            registry=self.metrics_registry,
        )
        broker = config.broker
        endpoint = Endpoint(
            broker.host, broker.port, broker.tls, broker.publish_timeout_s, broker.reconnect_max_s
        )
        session = endpoint_config(setup.bundle, endpoint)
        self.link = ServiceLink(
            session,
            spool_dir=spool,
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
                "keys": self._keys_ready,
                "store": self._store_ok,
                "disk": self.disk.readiness,
            },
            host=config.http_host,
        )
        self._lock = threading.Lock()
        self._online: set[str] = set()
        self._opened = 0  # rounds opened, counted from the store: max_rounds holds over restarts
        self._ended_at: float | None = None
        self._not_opened: str | None = None  # why the last try to open a round failed
        self._started = time.monotonic()
        self._seen_terminal: int | None = None
        self._audited: tuple[int, Stage] | None = None
        self.store: Store | None = None
        self.audit: AuditLog | None = None
        # None while the disk is full: nothing is handled until the space is back.
        self.service: AggregatorService | None = None
        self._open_state(RESTART_REASON)

    def _open_state(self, reason: str) -> bool:
        """Open the store and the audit log, abort every round a crash (or a full disk) left
        in flight, with `reason`, and build the service. False when the disk is full (noted
        in `self.disk`: not ready, retried once the space is back)."""
        config = self.config
        try:
            if self.store is None:
                self.store = open_checked_store(config.layout, config.study_id)
            if self.audit is None:
                self.audit = open_service_audit(
                    config.layout.audit_log, anchor_file=config.audit_anchor_file
                )
            for study_id, number in self.store.recover(reason):
                self.audit.append(
                    "round-aborted", {"study_id": study_id, "round": number, "reason": reason}
                )
                log.warning(
                    Event.ROUND_RECOVERED, extra={"fields": {"study": study_id, "round": number}}
                )
        except OSError as error:  # DiskFull is one; the audit log raises a bare ENOSPC
            self._disk_full(error)
            return False
        self.service = AggregatorService(
            config,
            self._keys,
            self.setup.roster,
            self.store,
            Registry(self.store, config.registry_dir),
            time.time,
            genesis=self._genesis,
            export_onnx=self.setup.model.export,
            terms=self.setup.terms,
            audit=AuditSetup(self.setup.manifest, self.audit),
        )
        self._audited = None
        self._opened = self.store.latest_round(config.study_id) or 0
        latest = self.service.registry.latest(config.study_id)
        if latest is not None:
            self.metrics.set_model(latest.record.version, latest.record.model_hash)
        self.metrics.set_disk_full(False)
        return True

    def _disk_full(self, error: OSError) -> None:
        """Stop handling anything until the space is back (`run` resumes); re-raise an
        error that is not about space."""
        full = disk_full_error(error, self.config.state_dir)
        if full is None:
            raise error
        self.disk.note(full)
        self.metrics.set_disk_full(True)
        self.service = None  # its round is aborted when the space is back, as at a restart

    # --- wiring ----------------------------------------------------------------------------

    def _count_wire(self, direction: str, count: int) -> None:
        self.metrics.add_wire_bytes("sent" if direction == "sent" else "received", count)

    def _keys_ready(self) -> bool:
        """The signing, HPKE and broker TLS keys on disk are this aggregator's in the roster
        (raises if not)."""
        config, broker = self.config, self.config.broker
        tls = None
        if broker.tls and broker.ca_file and broker.cert_file and broker.key_file:
            tls = TlsFiles(broker.ca_file, broker.cert_file, broker.key_file)
        entry = self.setup.bundle.roster.member(config.aggregator_id)
        check_member_keys(entry, config.signing_key, hpke_key=config.hpke_key, tls=tls)
        return True

    def _store_ok(self) -> bool:
        if self.store is None:
            return False
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
            topics.fetch_requests(fed, study),
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
        if self.store is not None:
            self.store.close()
        if self.audit is not None:
            self.audit.close()
        self.repeats.uninstall()

    def _publish(self, outgoing: Iterable[Outgoing]) -> None:
        """Post to the outbox, in order; returns at once (the outbox waits for the broker)."""
        for out in outgoing:
            self.link.publish(out.topic, out.payload, retain=out.retain)

    def _on_payload(self, topic: str, payload: bytes) -> None:
        with self._lock:
            if self.service is None:
                return  # the disk is full: dropped, its round is aborted once space is back
            try:
                outgoing = self.service.on_message(topic, payload)
                # The audit log first: a partial sum is on record before it leaves the
                # process, so a store rebuilt from the log (aggregator.rebuild) keeps every
                # sum's fact.
                self._note_round_end()
                self._publish(outgoing)
            except OSError as error:
                self._disk_full(error)

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
        """Tick and (leader) open rounds until `stop` is set; while the disk is full, wait
        for the space, then start over as after a restart."""
        while not stop.wait(TICK_S):
            self.metrics.set_broker_connected(self.link.connected)
            self._report_intake()
            with self._lock:
                if self.service is None:
                    if self.disk.poll() and self._open_state(DISK_FULL_REASON):
                        self._ended_at = time.monotonic()  # the next round after pause_s
                    continue
                try:
                    self._step(self.service)
                except OSError as error:
                    self._disk_full(error)

    def _step(self, service: AggregatorService) -> None:
        """One tick of the main loop (under the lock): time in, and the leader's next round."""
        outgoing = service.tick()
        self._note_round_end()
        self._publish(outgoing)
        if not (self.config.is_leader and self._ready_for_next_round()):
            return
        free = free_bytes(self.config.state_dir)
        if free < self.disk.reserve:  # no round the nodes would spend epsilon on for nothing
            raise DiskFull(str(self.config.state_dir), self.disk.reserve, free)
        try:
            opened = service.open_round(self.setup.roster_sites, available=set(self._online))
        except BaseModelSpent as exc:
            # A retry on a summed base waits for the nodes of that sum to return (tried
            # again every tick, logged once per reason).
            if str(exc) != self._not_opened:
                self._not_opened = str(exc)
                log.error(Event.ROUND_NOT_OPENED, extra={"fields": {"reason": str(exc)}})
            return
        self._not_opened = None
        self._opened += 1
        self._audit_progress()  # `round-opened` is on record before it is out
        self._publish(opened)
        current = service.current
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
                if self.audit is not None:  # None while the disk is full: logged only
                    try:
                        self.audit.append("intake-throttled", fields)
                    except OSError as error:
                        self._disk_full(error)
            log.warning(Event.INTAKE_THROTTLED, extra={"fields": fields})

    def _audit_progress(self) -> None:
        """Append the audit entries for what the round did since the last call: opened,
        participant set agreed, released (with any strategy switch), aborted."""
        service, audit, store = self.service, self.audit, self.store
        current = None if service is None else service.current
        if service is None or audit is None or store is None or current is None:
            return
        state, a = current.state, current.announcement
        seen_round, seen_stage = self._audited or (0, Stage.OPEN)
        if state.round != seen_round:
            seen_stage = Stage.OPEN
            audit.append("round-opened", {
                "study_id": a.study_id, "round": a.round, "leader": a.leader_id,
                "algorithm": a.algorithm, "expected": len(a.expected_nodes),
                "min_participants": a.min_participants,
            })  # fmt: skip
        order = list(Stage)
        # Written whenever this aggregator decided a partial sum, even in a round that has
        # aborted since: the rebuild of a lost store takes every sum's fact from here.
        if (
            state.participants is not None
            and order.index(seen_stage) < order.index(Stage.SUMMING)
            and (
                state.stage is not Stage.ABORTED
                or store.published_sum(a.study_id, a.round) is not None
            )
        ):
            audit.append("participant-set", {
                "study_id": a.study_id, "round": a.round, "count": len(state.participants),
                "nodes": list(state.participants),
                # leader: nodes whose sealed statements differed between aggregators
                "left_out_statement_mismatch": list(current.left_out),
            })  # fmt: skip
        if state.stage is Stage.RELEASED and seen_stage is not Stage.RELEASED:
            latest = service.registry.latest(a.study_id)
            if latest is not None:
                audit.append("release", {
                    "study_id": a.study_id, "round": a.round, "version": latest.record.version,
                    "model_hash": latest.record.model_hash.hex(),
                })  # fmt: skip
                for switch in latest.card["strategy"]["switches"]:
                    audit.append("strategy-switch", {"study_id": a.study_id, **switch})
        if state.stage is Stage.ABORTED and seen_stage is not Stage.ABORTED:
            audit.append("round-aborted", {
                "study_id": a.study_id, "round": a.round, "reason": state.abort_reason,
            })  # fmt: skip
        self._audited = (state.round, state.stage)

    def _note_round_end(self) -> None:
        self._audit_progress()
        service = self.service
        current = None if service is None else service.current
        if service is None or current is None or not current.state.stage.is_terminal:
            return
        if self._seen_terminal == current.state.round:
            return
        self._seen_terminal = current.state.round
        self._ended_at = time.monotonic()
        outcome = current.state.stage.name.lower()
        self.rounds_ended.labels(outcome=outcome).inc()
        latest = service.registry.latest(self.config.study_id)
        if latest is not None:
            self.metrics.set_model(latest.record.version, latest.record.model_hash)

    def _ready_for_next_round(self) -> bool:
        if not self.link.connected or self._opened >= self.setup.max_rounds:
            return False
        if self.link.pending:
            # The last round's release (or abort) is still on its way: a deadline planned
            # now would run while it uploads.
            return False
        current = None if self.service is None else self.service.current
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
