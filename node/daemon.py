"""`tessera node run`: a hospital's node on a real broker, from start-up to hot swap.

Start-up (`node.setup`), each step failing with a message that names the fix:

1. the configuration (`node.config`), the startup bundle (this site's, with the
   coordinator-signed roster), the manifest verified against the bundle's pinned
   coordinator key and checked to name the same members and keys as the roster
   (`broker.provisioning.member`);
2. the study and the model it trains (`tessera.models.study`); the audit log (counts only),
   the privacy ledger, the model store; the newest accepted release becomes the training
   base (the study's genesis model before the first), and the store's current version
   (pinned, else newest) is loaded for inference;
3. with `[receiver] enabled`, the DICOM C-STORE receiver, which writes what a PACS pushes
   to `<state_dir>/received`; with `dicom_dir` or the receiver, one intake pass (quarantine,
   cache) over the DICOM folder and the received folder before connecting, repeated every
   `intake_interval_s`; training reads the cache, never the DICOM folders;
4. the HTTP endpoints (`/healthz`; `/readyz`: broker connected, keys loaded, a verified
   model serving; `/metrics`; `POST /v1/infer`), then the MQTT session.

Rounds: each RoundOpen (a chunked payload on the study's round topic) is queued for one
worker thread, which answers it with `node.round.participation.participate`: every term is
checked before the cache is read, a refusal is audited and sends nothing, a joined round
publishes one sealed share per aggregator. The site policy file is re-read for every round,
so setting `paused = true` in it takes effect at the next RoundOpen.

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
audited and changes nothing. After an install the training base moves to the newest
version and inference swaps to the store's current version without a restart. The store is
re-read every few seconds, so `tessera node models pin|unpin|rollback` on the same state
folder changes the served model of a running node.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from prometheus_client import Counter
from pynetdicom.transport import ThreadedAssociationServer

from broker import topics
from broker.service_link import run_until_signalled
from node.config import NodeConfig
from node.errors import NodeError
from node.inference.http import infer_request
from node.inference.runtime import ModelSlot, load_model
from node.intake.screen import IntakeLimits
from node.round.candidate import (
    AuditFailed,
    CandidateIgnored,
    CandidateRefused,
    JoinedRounds,
    audit_candidate,
)
from node.round.participation import Joined, participate, reconcile_epsilon_audit
from node.round.receipts import ReceiptBook, ShareReceipt
from node.round.releases import ReleaseRefused, accept_release, parse_release
from node.setup import NodeSetup, load_node_setup
from tessera.errors import AuthenticationError, CodecError, TesseraError
from tessera.limits import MAX_RECEIPT_SET_BYTES, MAX_RELEASE_PAYLOAD_BYTES, MAX_ROUND_OPEN_BYTES
from tessera.observability.events import Event
from tessera.observability.http import HealthServer, Request, Response
from tessera.wire.envelopes import open_envelope
from tessera.wire.messages import ReceiptSet, RoundAbort, RoundOpen
from tessera.wire.release import is_signature_note

log = logging.getLogger("tessera.node.daemon")
STORE_POLL_S = 2.0


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
        self.base = setup.newest_model()
        self.slot = ModelSlot()
        self.serving: int | None = None
        self.metrics.set_epsilon_spent(self.study.id, self.ledger.state().epsilon_spent)
        self._refresh_inference()
        self.health = HealthServer(
            self.config.http_port,
            setup.metrics_registry,
            readiness={
                "broker": lambda: self.link.connected,
                "keys": lambda: True,
                "model": lambda: self.serving is not None,
            },
            routes={("POST", "/v1/infer"): self._infer},
            host=self.config.http_host,
        )
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

    # --- start and stop --------------------------------------------------------------------

    def start(self) -> NodeDaemon:
        """Serve HTTP, start the round worker, subscribe and connect."""
        self.health.start()
        if self.config.receiver.enabled:
            self.receiver = self.setup.start_receiver()
        if self.setup.intake_enabled:
            self._ingest()  # before any round can arrive: rounds train on the cache
        self._worker.start()
        fed, study = self.manifest.federation_id, self.study.id
        self.link.subscribe(topics.round_topic(fed, study), self._on_round)
        self.link.subscribe(topics.release_topic(fed, study), self._on_release)
        self.link.subscribe(topics.all_receipts(fed, study), self._on_receipts)
        if self.study.privacy_audit is not None:
            topic = topics.candidate_topic(fed, study, self.config.site_id)
            self.link.subscribe(topic, self._on_candidate)
        self.link.start()
        log.info(Event.NODE_STARTED, extra={"fields": {
            "site": self.config.site_id, "study": study, "model_version": self.serving,
            "http_port": self.health.port,
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
            with self._lock:
                if self.store.reload():
                    self._refresh_inference()
            if stop.wait(STORE_POLL_S):
                return

    def close(self) -> None:
        """Stop the worker, disconnect, stop serving, close the audit log."""
        self._rounds.put(None)
        self._worker.join(30)
        if self.receiver is not None:
            self.receiver.shutdown()
        self.link.close()
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
                log.error(
                    Event.ROUND_FAILED,
                    extra={"fields": {"error": type(error).__name__, "reason": str(error)}},
                )

    def _answer_round(self, payload: bytes) -> None:
        with self._lock:
            ctx = self.setup.participation_context(self.base)
        try:
            outcome = participate(payload, ctx)
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
        self.metrics.set_epsilon_spent(self.study.id, self.ledger.state().epsilon_spent)
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
        except (TesseraError, OSError, ValueError) as error:
            log.error(
                Event.INTAKE_FAILED,
                extra={"fields": {"error": type(error).__name__, "reason": str(error)}},
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
            self.base = self.setup.newest_model()
            self._refresh_inference()
        fields = {"version": record.version, "round": record.round, "serving": self.serving}
        log.info(Event.RELEASE_INSTALLED, extra={"fields": fields})

    def _refresh_inference(self) -> None:
        version = self.store.current()
        if version is None or version == self.serving:
            return
        try:
            self.slot.swap(load_model(self.store.onnx_bytes(version)))
        except NodeError as error:  # a damaged or incompatible file: keep serving the old one
            log.error(
                Event.MODEL_UNUSABLE, extra={"fields": {"version": version, "reason": str(error)}}
            )
            return
        self.serving = version
        record = self.store.get(version)
        assert record is not None
        self.metrics.set_model(version, bytes.fromhex(record.model_hash))
        log.info(
            Event.MODEL_SWAPPED,
            extra={"fields": {"version": version, "pinned": self.store.pinned is not None}},
        )

    def _infer(self, request: Request) -> Response:
        with self.metrics.time_inference() as timer:
            status, body = infer_request(self.slot, self.setup.secret, IntakeLimits(), request.body)
            timer.outcome = "ok" if status == 200 else "rejected" if status == 400 else "error"
        return Response.json(status, body)

    def _count_wire(self, direction: str, count: int) -> None:
        self.metrics.add_wire_bytes("sent" if direction == "sent" else "received", count)


def run(config: NodeConfig) -> int:
    """Start the node and run it until SIGTERM/SIGINT; the exit status."""
    return run_until_signalled(NodeDaemon(load_node_setup(config)).start(), Event.NODE_STOPPED)
