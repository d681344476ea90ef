"""`tessera node run`: a hospital's node on a real broker, from start-up to hot swap.

Start-up (`node.setup`), each step failing with a message that names the fix:

1. the configuration (`node.config`), the startup bundle (this site's, with the
   coordinator-signed roster), the manifest verified against the bundle's pinned
   coordinator key and checked to name the same members and keys as the roster
   (`broker.provisioning.member`);
2. the study and the model it trains (`tessera.models.study`); the audit log (counts only),
   the privacy ledger, held against the audit log both ways (`node.privacy.reconcile`: a
   ledger missing or behind makes the node unready and refuse every round until it is
   restored or rebuilt, re-checked whenever its file changes), the model store; the newest
   intact accepted release becomes the training base (the study's genesis model before the
   first), and the newest intact version up to the store's current one (pinned, else
   newest) is loaded for inference; a damaged version is repaired or fetched again
   (`node.model_keeper`);
3. with `[receiver] enabled`, the DICOM C-STORE receiver, which writes what a PACS pushes
   to `<state_dir>/received`; with `dicom_dir` or the receiver, one intake pass (quarantine,
   cache) over the DICOM folder and the received folder before connecting, repeated every
   `intake_interval_s`; training reads the cache, never the DICOM folders;
4. the HTTP endpoints (`/healthz`; `/readyz` with the checks `READINESS_CHECKS`: `broker`
   connected, `keys` on disk the roster's, `model` a verified release serving, the `privacy
   ledger` not behind, the `disk` not full, the `clock` within `max_clock_skew_s` of the
   leader's, with the measured offset under `info` and warnings naming what needs the
   operator; `/metrics`), and with `[inference] enabled` the inference listener
   (`POST /v1/infer`, `node.inference.http`: loopback unless configured, TLS and a token's
   hash otherwise, a bounded worker pool), then the MQTT session.

Rounds: each RoundOpen (a chunked payload on the study's round topic) is queued for one
worker thread, which answers it with `node.round.participation.participate`: every term is
checked before the cache is read, a refusal is audited and sends nothing, a joined round
publishes one sealed share per aggregator. Publishing only posts to the link's outbox: the
worker never waits for the broker, and what it posted during a broker outage goes out once
the session is back (`broker.outbox`). Each live RoundOpen from the leader is also a
sample of this node's clock against the leader's (`node.round.clock`): the round's deadline
is judged on the leader's clock as measured, and a clock further off than the node
tolerates refuses the round with "clock-skew" and the fix. The site policy file is re-read
for every round, so setting `paused = true` in it takes effect at the next RoundOpen.

Privacy audits (studies that require one): the leader publishes each round's candidate
model, signed by itself alone. The same worker thread answers it with
`node.round.candidate.audit_candidate`: a node that joined that round verifies it, audits it
with the round's recipe and the `[privacy_audit]` budget, signs the report of aggregate
figures with its node key and publishes it; the audit log records each audit and its
headline figures. A candidate is never installed or served. An audit that fails (too few
held-out images, or an empirical bound above the accountant's epsilon) sends nothing, so
the aggregators hold the release for the missing report.

Receipts: when an aggregator closes collection it publishes the commitments of the
statements it holds (`ReceiptSet`). For a round this node joined, each aggregator's receipts
either list the commitment of the statement it sent (`share-confirmed`) or not: that
aggregator closed the round without this node's share, which the round then leaves out
although its epsilon was charged (`share-not-received`, a warning, the counter
`tessera_node_shares_not_received`, and an audit entry; `node.round.receipts`).

Releases: a release is installed only through `node.round.releases.accept_release` (every
aggregator's signature, every hash, the ONNX naming these weights); a refused one is
audited and changes nothing. A release that does not fit on the disk is neither refused nor
lost: the node says "disk full" (log, `/readyz`, `tessera_disk_full`), leaves the message
unacknowledged so the broker keeps it (`broker.errors.DeliveryDeferred`), and installs it
when it is offered again after the space is back. After an install the training base moves
to the newest version and inference swaps to the store's current version without a restart.
The store is re-read every few seconds, so `tessera node models pin|unpin|rollback` on the
same state folder changes the served model of a running node.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hmac
import logging
import queue
import sqlite3
import threading
import time
from pathlib import Path

from prometheus_client import Counter, Gauge
from pynetdicom.transport import ThreadedAssociationServer

from broker import topics
from broker.errors import DeliveryDeferred
from broker.provisioning.key_check import check_member_keys
from broker.service_link import run_until_signalled
from node.config import NodeConfig
from node.errors import NodeError
from node.inference.http import InferenceServer
from node.inference.runtime import ModelSlot
from node.model_keeper import ModelKeeper
from node.privacy.ledger import PrivacyLedger
from node.privacy.reconcile import LedgerGap, ledger_gap, reconcile_epsilon_audit
from node.round.candidate import (
    AuditFailed,
    CandidateIgnored,
    CandidateRefused,
    JoinedRounds,
    audit_candidate,
)
from node.round.clock import ClockReading, LeaderClock
from node.round.participation import Joined, participate
from node.round.receipts import ReceiptBook, ShareReceipt
from node.round.releases import ReleaseRefused, accept_release, parse_release
from node.setup import NodeSetup, load_node_setup
from tessera.errors import AuthenticationError, CodecError, DiskFull, TesseraError
from tessera.files import DiskWatch, disk_full_error
from tessera.limits import MAX_RECEIPT_SET_BYTES, MAX_RELEASE_PAYLOAD_BYTES, MAX_ROUND_OPEN_BYTES
from tessera.observability.events import Event
from tessera.observability.http import HealthServer
from tessera.wire.envelopes import open_envelope, seal_envelope
from tessera.wire.messages import ReceiptSet, ReleaseRequest, RoundAbort, RoundOpen
from tessera.wire.release import is_signature_note

log = logging.getLogger("tessera.node.daemon")
STORE_POLL_S = 2.0


# The /readyz checks, in the order it names failing ones (the README's table lists them).
READINESS_CHECKS = ("broker", "keys", "model", "privacy ledger", "disk", "clock")


class NodeDaemon:
    """One running node: rounds, releases, inference, health; see the module docstring."""

    def __init__(self, setup: NodeSetup) -> None:
        self.setup, self.config = setup, setup.config
        self.manifest, self.study = setup.member.manifest, setup.member.study
        self.audit, self.store, self.ledger = setup.audit, setup.store, setup.ledger
        self.metrics = setup.metrics
        self.aggregator_signing = setup.member.aggregator_signing
        if reconcile_epsilon_audit(self.ledger, self.audit):
            log.warning(Event.EPSILON_RECONCILED, extra={"fields": {"study": self.study.id}})
        # A second view of the same file for the main thread's checks: the round worker
        # charges through `self.ledger`, and neither may swap the other's contents.
        self._ledger_view = PrivacyLedger(self.ledger.path, self.ledger.study_id,
                                          self.ledger.budget, self.ledger.delta,
                                          self.ledger.accountant)  # fmt: skip
        self.ledger_gap: LedgerGap | None = None
        self.ledger_problem: str | None = None  # why the node may not train, with the fix
        self._ledger_stamp: tuple[int, ...] | None = None
        self._check_ledger()
        self.slot = ModelSlot()
        self.models = ModelKeeper(setup, self.slot)
        self.base = self.models.training_base()
        self.models.refresh()
        # A write that found no space (a release, a round, intake): not ready until the
        # space it needed is back; the release itself is delivered again (DeliveryDeferred).
        self.disk = DiskWatch(reserve=0)
        self.clock = LeaderClock(self.config.state_dir, self.config.max_clock_skew_s)
        self.clock_offset = Gauge(
            "tessera_clock_offset_seconds",
            "How far this node's clock is ahead of the leader's (negative: behind), estimated "
            "one-way from the leader's signed RoundOpen (skew plus transit); NaN until measured.",
            registry=setup.metrics_registry,
        )
        self._clock_beyond = False
        self._show_clock(self.clock.reading())
        self.health = HealthServer(
            self.config.http_port,
            setup.metrics_registry,
            readiness={
                "broker": lambda: self.link.connected,
                "keys": self._keys_ready,
                "model": self._model_verified,
                "privacy ledger": lambda: self.ledger_problem is None,
                "disk": self.disk.readiness,
                "clock": self._clock_ready,
            },
            info={"clock": lambda: self.clock.reading().as_info()},
            host=self.config.http_host,
            warnings=self._warnings,
        )
        self.inference: InferenceServer | None = None
        if self.config.inference.enabled:
            serve = self.config.inference.serve_config()
            self.inference = InferenceServer(self.slot, setup.secret, serve, self.metrics)
        self.link = setup.link(self._count_wire)
        # Work for the one worker thread, in arrival order: ("round", RoundOpen bytes) or
        # ("candidate", candidate bytes); None stops it.
        self._rounds: queue.Queue[tuple[str, bytes] | None] = queue.Queue(maxsize=8)
        self._joined = JoinedRounds()  # the last rounds joined, by number; worker thread only
        fed = self.manifest.federation_id
        self.receipts = ReceiptBook(self.audit.path, fed, self.study.id)
        self.shares_not_received = Counter(
            "tessera_node_shares_not_received",
            "Shares this node sent that an aggregator's receipts did not list (left out).",
            registry=setup.metrics_registry,
        )
        self.shares_confirmed = Counter(
            "tessera_node_shares_confirmed",
            "Shares this node sent that an aggregator's receipts listed.",
            registry=setup.metrics_registry,
        )
        self._lock = threading.Lock()  # the training base and the store, between threads
        self._worker = threading.Thread(target=self._round_worker, name="rounds", daemon=True)
        self.receiver: ThreadedAssociationServer | None = None

    @property
    def serving(self) -> int | None:
        """The version inference serves (None before the first intact one)."""
        return self.models.serving

    # --- start and stop --------------------------------------------------------------------

    def start(self) -> NodeDaemon:
        """Serve HTTP, start the round worker, subscribe and connect."""
        self.health.start()
        if self.inference is not None:
            self.inference.start()
        if self.config.receiver.enabled:
            self.receiver = self.setup.start_receiver()
        if self.setup.intake_enabled:
            self._ingest()  # before any round can arrive: rounds train on the cache
        self._worker.start()
        fed, study = self.manifest.federation_id, self.study.id
        self.link.subscribe(topics.round_topic(fed, study), self._on_round)
        self.link.subscribe(topics.release_topic(fed, study), self._on_release)
        self.link.subscribe(topics.all_receipts(fed, study), self._on_receipts)
        site = self.config.site_id  # a release sent again to this node alone
        self.link.subscribe(topics.release_copy_topic(fed, study, site), self._on_release)
        if self.study.privacy_audit is not None:
            topic = topics.candidate_topic(fed, study, self.config.site_id)
            self.link.subscribe(topic, self._on_candidate)
        self.link.start()
        log.info(Event.NODE_STARTED, extra={"fields": {
            "site": self.config.site_id, "study": study, "model_version": self.serving,
            "http_port": self.health.port,
            "inference_port": None if self.inference is None else self.inference.port,
        }})  # fmt: skip
        return self

    def run(self, stop: threading.Event) -> None:
        """Ingest (when configured) and follow the model store until `stop` is set."""
        next_intake = time.monotonic() + self.config.intake_interval_s
        while True:
            if self.setup.intake_enabled and time.monotonic() >= next_intake:
                self._ingest()
                next_intake = time.monotonic() + self.config.intake_interval_s
            self.metrics.set_broker_connected(self.link.connected)
            self._check_ledger()
            if self.disk.full and self.disk.poll():
                self.metrics.set_disk_full(False)
            # Entries the receiver or a command-line tool appended get their anchor out too.
            self.audit.catch_up()
            with self._lock:
                if self.store.reload():
                    self.models.refresh()
                due = self.models.due_requests(time.monotonic()) if self.link.connected else []
            for request in due:
                self._request_release(request)
            if stop.wait(STORE_POLL_S):
                return

    def close(self) -> None:
        """Stop the worker, disconnect, stop serving, close the audit log."""
        self._rounds.put(None)
        self._worker.join(30)
        if self.receiver is not None:
            self.receiver.shutdown()
        self.link.close()
        if self.inference is not None:
            self.inference.shutdown()
        self.health.close()
        self.audit.close()

    # --- rounds ----------------------------------------------------------------------------

    def _on_round(self, _topic: str, payload: bytes) -> None:
        try:
            signed = open_envelope(payload, self.aggregator_signing, MAX_ROUND_OPEN_BYTES)
        except (TesseraError, ValueError) as error:
            log.warning(Event.MESSAGE_REJECTED, extra={"fields": {"error": type(error).__name__}})
            return
        message = signed.message
        if isinstance(message, RoundAbort):
            fields = {"round": message.round, "reason": message.reason}
            log.info(Event.ROUND_ABORT_RECEIVED, extra={"fields": fields})
            return
        if not isinstance(message, RoundOpen):
            return
        if (
            signed.signer_id == self.setup.member.leader
            and message.opened_ms
            and not self.link.delivering_retained  # a replay is as old as its round
        ):
            self._show_clock(self.clock.observe(message.opened_ms))
        try:
            self._rounds.put_nowait(("round", payload))
        except queue.Full:
            log.warning(Event.ROUND_DROPPED, extra={"fields": {"round": message.round}})

    def _on_candidate(self, _topic: str, payload: bytes) -> None:
        try:
            self._rounds.put_nowait(("candidate", payload))
        except queue.Full:
            log.warning(Event.CANDIDATE_DROPPED, extra={"fields": {"reason": "worker busy"}})

    def _round_worker(self) -> None:
        while True:
            work = self._rounds.get()
            if work is None:
                return
            kind, payload = work
            try:
                if kind == "round":
                    self._answer_round(payload)
                else:
                    self._audit_candidate(payload)
            except Exception as error:  # noqa: BLE001 - one failed round must not stop the node
                full = self._disk_full(error)
                log.error(
                    Event.ROUND_FAILED,
                    extra={"fields": {"error": type(error).__name__, "reason": str(full or error)}},
                )

    def _answer_round(self, payload: bytes) -> None:
        with self._lock:
            ctx = self.setup.participation_context(self.base)
        # Deadlines are the leader's: judge them on its clock, as far as it was measured.
        reading = self.clock.reading()
        ctx = dataclasses.replace(ctx, clock=reading)
        now = dt.datetime.fromtimestamp(self.clock.now() - reading.correction_s, dt.UTC)
        try:
            outcome = participate(payload, ctx, now)
        except AuthenticationError:
            log.warning(Event.MESSAGE_REJECTED, extra={"fields": {"kind": "ROUND"}})
            return
        round_number = outcome.round_open.round
        if not isinstance(outcome, Joined):
            self.metrics.round_refused(outcome.reason)
            fields = {"round": round_number, "reason": outcome.reason, "detail": outcome.detail}
            log.warning(Event.ROUND_REFUSED, extra={"fields": fields})
            return
        for message in outcome.messages:
            self.link.publish(message.topic, message.payload)
        self._joined.remember(outcome.round_open)
        result = outcome.update.result
        self.metrics.round_joined()
        self.metrics.add_samples(result.train_samples)
        self._set_epsilon_metric(self.ledger.state().epsilon_spent)
        log.info(Event.ROUND_JOINED, extra={"fields": {
            "round": round_number, "samples": result.train_samples,
            "epsilon_round": outcome.epsilon_spent,
            "epsilon_total": self.ledger.state().epsilon_spent,
            "validation_loss": result.validation.loss,
            "validation_accuracy": result.validation.accuracy,
            "bytes_sent": sum(len(m.payload) for m in outcome.messages),
            "plaintext_bytes": 4 * outcome.round_open.vector_length,
        }})  # fmt: skip
        self._record_receipts(self.receipts.on_joined(round_number))

    def _on_receipts(self, topic: str, payload: bytes) -> None:
        """An aggregator's receipts: judged against this node's share (`node.round.receipts`)."""
        try:
            signed = open_envelope(payload, self.aggregator_signing, MAX_RECEIPT_SET_BYTES)
            receipts = signed.message
            if not isinstance(receipts, ReceiptSet) or topics.parse(topic).aggregator != (
                receipts.aggregator_id
            ):
                raise CodecError("not an aggregator's own ReceiptSet on its receipts topic")
        except (TesseraError, ValueError) as error:
            fields = {"kind": "RECEIPTS", "error": type(error).__name__}
            log.warning(Event.MESSAGE_REJECTED, extra={"fields": fields})
            return
        self._record_receipts(self.receipts.on_receipt(receipts))

    def _record_receipts(self, verdicts: list[ShareReceipt]) -> None:
        for verdict in verdicts:
            fields = {"round": verdict.round, "aggregator": verdict.aggregator}
            entry = {"study_id": self.study.id, **fields, "held": verdict.held}
            if verdict.received:
                self.shares_confirmed.inc()
                self.audit.append("share-received", entry)
                log.info(Event.SHARE_CONFIRMED, extra={"fields": fields})
            else:
                self.shares_not_received.inc()
                self.audit.append("share-not-received", entry)
                log.warning(
                    Event.SHARE_NOT_RECEIVED, extra={"fields": {**fields, "held": verdict.held}}
                )

    def _ingest(self) -> None:
        try:
            summary = self.setup.ingest()
        except (TesseraError, OSError, ValueError, sqlite3.Error) as error:
            full = self._disk_full(error)
            if full is None and isinstance(error, sqlite3.Error):
                raise
            log.error(
                Event.INTAKE_FAILED,
                extra={"fields": {"error": type(error).__name__, "reason": str(full or error)}},
            )
            return
        for reason, count in summary.reasons.items():
            for _ in range(count):
                self.metrics.quarantine(reason)
        if summary.quarantined:
            self.audit.append("quarantine", {"count": summary.quarantined})
        log.info(Event.INTAKE, extra={"fields": {**summary.as_dict()}})

    # --- privacy audits of candidates ------------------------------------------------------

    def _audit_candidate(self, payload: bytes) -> None:
        """Audit the leader's candidate of a round this site joined and publish the signed
        report (`node.round.candidate`); anything else is logged and dropped."""
        outcome = audit_candidate(payload, self.setup.candidate_context(self._joined))
        if isinstance(outcome, CandidateRefused):
            log.warning(Event.CANDIDATE_REFUSED, extra={"fields": {"error": outcome.error}})
        elif isinstance(outcome, CandidateIgnored):
            log.info(Event.CANDIDATE_IGNORED, extra={"fields": {"round": outcome.round}})
        elif isinstance(outcome, AuditFailed):
            log.error(
                Event.PRIVACY_AUDIT_FAILED,
                extra={"fields": {"round": outcome.round, "outcome": outcome.outcome,
                                  "reason": outcome.detail}},
            )  # fmt: skip
        else:
            self.link.publish(outcome.message.topic, outcome.message.payload)
            log.info(
                Event.PRIVACY_AUDIT, extra={"fields": {"round": outcome.round, **outcome.figures}}
            )

    # --- releases and inference ------------------------------------------------------------

    def _on_release(self, _topic: str, payload: bytes) -> None:
        try:
            release = parse_release(payload, self.aggregator_signing, MAX_RELEASE_PAYLOAD_BYTES)
        except (TesseraError, ValueError) as error:
            log.warning(Event.RELEASE_REFUSED, extra={"fields": {"error": type(error).__name__}})
            return
        if is_signature_note(release):
            return  # a follower's signature for the leader, not a release
        with self._lock:
            try:
                record = accept_release(payload, self.aggregator_signing, self.store)
            except (AuthenticationError, ReleaseRefused) as error:
                reason = getattr(error, "reason", "not-verified")
                fields = {"version": release.version, "reason": reason}
                log.warning(Event.RELEASE_REFUSED, extra={"fields": fields})
                return
            except OSError as error:
                full = self._disk_full(error)
                if full is None:
                    raise
                # Not acknowledged: the broker keeps the release and the session offers it
                # again until it fits (broker.session); nothing is lost, nothing refused.
                raise DeliveryDeferred(str(full)) from None
            if self.disk.full and self.disk.poll():  # it fitted: ready again, not in 2 s
                self.metrics.set_disk_full(False)
            self.models.accepted(record.version)
            self.base = self.models.training_base()
            self.models.refresh()
        fields = {"version": record.version, "round": record.round, "serving": self.serving}
        log.info(Event.RELEASE_INSTALLED, extra={"fields": fields})

    # --- a full disk, the clock ----------------------------------------------------------------

    def _disk_full(self, error: BaseException) -> DiskFull | None:
        """The DiskFull that `error` means (noted: not ready until the space is back), or
        None when it is not about space."""
        full = disk_full_error(error, self.config.state_dir)
        if full is not None:
            self.disk.note(full)
            self.metrics.set_disk_full(True)
        return full

    def _show_clock(self, reading: ClockReading) -> None:
        """Publish the clock's reading as a metric; log when it crosses the tolerance."""
        self.clock_offset.set(float("nan") if reading.offset_s is None else reading.offset_s)
        if reading.beyond != self._clock_beyond:
            self._clock_beyond = reading.beyond
            if reading.beyond:
                fields = {"offset_s": reading.offset_s, "tolerated_s": reading.tolerated_s,
                          "reason": reading.refusal()}  # fmt: skip
                log.error(Event.CLOCK_SKEW, extra={"fields": fields})

    def _clock_ready(self) -> bool | str:
        reading = self.clock.reading()
        return reading.refusal() if reading.beyond else True

    def _request_release(self, request: ReleaseRequest) -> None:
        """Ask the aggregators again for a release held damaged (`node.model_keeper`)."""
        topic = topics.fetch_topic(request.federation_id, request.study_id, request.node_id)
        try:
            self.link.publish(topic, seal_envelope(request, request.node_id,
                                                   self.setup.signing_key))  # fmt: skip
        except (TesseraError, OSError) as error:  # not connected after all: the next interval
            fields = {"version": request.version, "error": type(error).__name__}
            log.warning(Event.RELEASE_REFETCH_FAILED, extra={"fields": fields})
            return
        log.warning(Event.RELEASE_REFETCH_REQUESTED, extra={"fields": {"version": request.version}})

    # --- the privacy ledger against the audit log -------------------------------------------

    def _check_ledger(self) -> None:
        """Hold the ledger against the audit log (`node.privacy.reconcile.ledger_gap`)
        whenever its file changed: a ledger missing or behind makes the node unready and
        refuse rounds until it is restored or rebuilt (the round worker checks again)."""
        stamp = _file_stamp(self.ledger.path)
        if stamp == self._ledger_stamp:
            return
        self._ledger_stamp = stamp
        was = self.ledger_problem
        try:
            gap = ledger_gap(self._ledger_view, self.audit.path)
        except TesseraError as error:  # e.g. a ledger being copied back: unready until whole
            self.ledger_problem = str(error)
            if was != self.ledger_problem:
                fields = {"study": self.study.id, "reason": str(error)}
                log.error(Event.LEDGER_BEHIND, extra={"fields": fields})
            return
        self.ledger_gap = gap
        self.ledger_problem = None if gap is None else gap.reason
        if gap is not None and was != gap.reason:
            log.error(Event.LEDGER_BEHIND, extra={"fields": {
                "study": self.study.id, "ledger_epsilon": gap.ledger_epsilon,
                "audit_epsilon": gap.audit_epsilon, "rounds": list(gap.missing_rounds),
                "reason": gap.reason,
            }})  # fmt: skip
        elif gap is None and was is not None:
            restored = {"study": self.study.id, "epsilon": self._ledger_view.spent}
            log.info(Event.LEDGER_RESTORED, extra={"fields": restored})
        self._set_epsilon_metric(self._ledger_view.spent)

    def _set_epsilon_metric(self, ledger_epsilon: float) -> None:
        """Never below what the audit log records, whatever the ledger says."""
        gap = self.ledger_gap
        spent = max(ledger_epsilon, gap.audit_epsilon if gap is not None else 0.0)
        self.metrics.set_epsilon_spent(self.study.id, spent)

    def _warnings(self) -> list[str]:
        problem = self.ledger_problem
        return ([problem] if problem is not None else []) + self.models.warnings()

    def _keys_ready(self) -> bool:
        """The signing key and the broker TLS key on disk are this site's (raises if not)."""
        bundle = self.setup.member.bundle
        tls = bundle.tls_files if self.config.broker.tls else None
        entry = bundle.roster.member(self.config.site_id)
        check_member_keys(entry, bundle.signing_key_file, tls=tls)
        return True

    def _model_verified(self) -> bool:
        """A release serves, and the ONNX bytes and weights it was loaded from hash to what
        its accepted (jointly signed) release names; False before the first release."""
        try:
            model = self.slot.current()
        except NodeError:
            return False
        record = self.store.get(int(model.version))
        if (
            record is None
            or not hmac.compare_digest(model.onnx_sha256, record.onnx_hash)
            or not hmac.compare_digest(model.metadata.model_hash, record.model_hash)
        ):
            raise NodeError(f"the model serving as version {model.version} is not its release")
        return True

    def _count_wire(self, direction: str, count: int) -> None:
        self.metrics.add_wire_bytes("sent" if direction == "sent" else "received", count)


def _file_stamp(path: Path) -> tuple[int, ...]:
    """What changes when a file is written, replaced or deleted."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return ()
    return (status.st_ino, status.st_size, status.st_mtime_ns)


def run(config: NodeConfig) -> int:
    """Start the node and run it until SIGTERM/SIGINT; the exit status."""
    return run_until_signalled(NodeDaemon(load_node_setup(config)).start(), Event.NODE_STOPPED)
