"""`tessera node run`: a hospital's node on a real broker, from start-up to hot swap.

Start-up, each step failing with a message that names the fix:

1. the configuration (`node.config`), the startup bundle (this site's, with the
   coordinator-signed roster), the manifest verified against the bundle's pinned
   coordinator key and checked to name the same members and keys as the roster;
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
model, signed by itself alone. A node that joined that round verifies it
(`tessera.wire.release.verify_candidate`), audits it on the same worker thread with the round's
recipe and the `[privacy_audit]` budget (`node.privacy.site_audit`), signs the report of aggregate
figures with its node key and publishes it; the audit log records each audit and its
headline figures. A candidate is never installed or served. An audit that fails (too few
held-out images, or an empirical bound above the accountant's epsilon) sends nothing, so
the aggregators hold the release for the missing report.

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

import numpy as np
from prometheus_client import CollectorRegistry
from pynetdicom.transport import ThreadedAssociationServer

from broker import topics
from broker.provisioning.bundle import Bundle, load_bundle
from broker.provisioning.roster import check_manifest_agrees
from broker.service_link import Endpoint, ServiceLink, endpoint_config, run_until_signalled
from node.config import NodeConfig
from node.errors import NodeError
from node.inference.http import infer_request
from node.inference.runtime import ModelSlot, load_model, preprocess_from_metadata
from node.intake.cache import CachedDataset
from node.intake.phi import load_or_create_site_secret
from node.intake.preprocess import PreprocessConfig
from node.intake.receiver import ReceiverConfig, start_receiver
from node.intake.screen import REASONS as QUARANTINE_REASONS
from node.intake.screen import IntakeLimits
from node.intake.worker import TEMP_PREFIX
from node.privacy.attacks import PrivacyAccountingError
from node.privacy.ledger import PrivacyLedger, ledger_path
from node.privacy.site_audit import SiteData, audit_at_site, candidate_target
from node.round.participation import (
    PROTOCOL_REASONS,
    Joined,
    ParticipationContext,
    participate,
    reconcile_epsilon_audit,
)
from node.round.policy import REASONS, SitePolicy, load_site_policy
from node.round.releases import (
    WEIGHTS_FILE,
    ModelStore,
    ReleaseRefused,
    accept_release,
    parse_release,
)
from node.training.federated import SiteTraining, round_train_config
from tessera.crypto.signing import load_private_key, public_key_bytes
from tessera.errors import AuthenticationError, ConfigError, TesseraError
from tessera.governance.approvals import load_approvals
from tessera.governance.audit import AuditLog
from tessera.governance.manifest import Manifest, load_manifest, verify_manifest
from tessera.governance.manifest_model import Study
from tessera.governance.privacy_report import sign_report
from tessera.models.nets import TesseraNet
from tessera.models.study import StudyModel
from tessera.models.weights import load_arrays, load_weights
from tessera.observability.http import HealthServer, Request, Response
from tessera.observability.metrics import ServiceMetrics
from tessera.wire.envelopes import open_envelope, open_envelope_as, require_fields
from tessera.wire.messages import ModelRelease, RoundAbort, RoundOpen
from tessera.wire.release import DEFAULT_MAX_RELEASE_PAYLOAD, is_signature_note, verify_candidate

log = logging.getLogger("tessera.node.daemon")
AUDIT_FILE = "audit.log"
STORE_POLL_S = 2.0
MAX_ROUND_MESSAGE = 1 << 20
RECEIVED_DIR = "received"  # under state_dir: where the C-STORE receiver writes
JOINED_KEPT = 8  # the rounds joined whose candidates this node would still audit


def study_preprocess(model: StudyModel) -> PreprocessConfig:
    """The preprocessing the study's terms fix (its other terms are the model's concern)."""
    return preprocess_from_metadata(dict(model.preprocess))


class NodeDaemon:
    """One running node: rounds, releases, inference, health; see the module docstring."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.bundle = _site_bundle(config)
        self.manifest = _verified_manifest(config, self.bundle)
        self.study = _study(self.manifest, config.study_id)
        architecture = config.architecture or _only(self.study.architectures)
        self.model_def = StudyModel.from_study(
            self.manifest.federation_id, self.study, architecture
        )
        self.preprocess = study_preprocess(self.model_def)
        self.signing_key = load_private_key(self.bundle.path / "signing.key")
        state = config.state_dir
        state.mkdir(parents=True, exist_ok=True)
        self.audit = AuditLog.open(state / AUDIT_FILE, counts_only=True)
        self.store = ModelStore(state, self.manifest.federation_id, self.study.id, self.audit)
        self.ledger = PrivacyLedger(
            ledger_path(state, self.study.id),
            self.study.id,
            self._policy().max_epsilon or self.study.dp.epsilon,
            self.study.dp.delta,
            config.training.accountant,
        )
        if reconcile_epsilon_audit(self.ledger, self.audit):
            log.warning("epsilon-reconciled", extra={"fields": {"study": self.study.id}})
        self.secret = load_or_create_site_secret(state)
        roster = self.bundle.roster
        signing, hpke = roster.signing_keys(), roster.hpke_keys()
        self.aggregator_signing = {a: signing[a] for a in roster.aggregator_ids}
        self.aggregator_hpke = {a: hpke[a] for a in roster.aggregator_ids}
        self.base = self._newest_model()
        self.slot = ModelSlot()
        self.serving: int | None = None
        self.metrics_registry = CollectorRegistry()
        self.metrics = ServiceMetrics(
            self.metrics_registry,
            refusal_reasons=(*REASONS, *PROTOCOL_REASONS),
            quarantine_reasons=QUARANTINE_REASONS,
        )
        self.metrics.set_epsilon_spent(self.study.id, self.ledger.state().epsilon_spent)
        self._refresh_inference()
        self.health = HealthServer(
            config.http_port,
            self.metrics_registry,
            readiness={
                "broker": lambda: self.link.connected,
                "keys": lambda: True,
                "model": lambda: self.serving is not None,
            },
            routes={("POST", "/v1/infer"): self._infer},
            host=config.http_host,
        )
        self.link = ServiceLink(
            endpoint_config(
                self.bundle, Endpoint(config.broker.host, config.broker.port, config.broker.tls)
            ),
            spool_dir=state / "spool",
            max_payload_bytes=DEFAULT_MAX_RELEASE_PAYLOAD,
            on_wire=self._count_wire,
        )
        # Work for the one worker thread, in arrival order: ("round", RoundOpen bytes) or
        # ("candidate", candidate bytes); None stops it.
        self._rounds: queue.Queue[tuple[str, bytes] | None] = queue.Queue(maxsize=8)
        self._joined: dict[int, RoundOpen] = {}  # the last rounds joined, by number
        self._lock = threading.Lock()  # the training base and the store, between threads
        self._worker = threading.Thread(target=self._round_worker, name="rounds", daemon=True)
        self.received_dir = state / RECEIVED_DIR
        self.receiver: ThreadedAssociationServer | None = None

    # --- start and stop --------------------------------------------------------------------

    def start(self) -> NodeDaemon:
        """Serve HTTP, start the round worker, subscribe and connect."""
        self.health.start()
        if self.config.receiver.enabled:
            self.receiver = self._start_receiver()
        if self._intake_enabled:
            self._ingest()  # before any round can arrive: rounds train on the cache
        self._worker.start()
        fed, study = self.manifest.federation_id, self.study.id
        self.link.subscribe(topics.round_topic(fed, study), self._on_round)
        self.link.subscribe(topics.release_topic(fed, study), self._on_release)
        if self.study.privacy_audit is not None:
            topic = topics.candidate_topic(fed, study, self.config.site_id)
            self.link.subscribe(topic, self._on_candidate)
        self.link.start()
        log.info(
            "node-started",
            extra={
                "fields": {
                    "site": self.config.site_id,
                    "study": study,
                    "model_version": self.serving,
                    "http_port": self.health.port,
                }
            },
        )
        return self

    def run(self, stop: threading.Event) -> None:
        """Ingest (when configured) and follow the model store until `stop` is set."""
        next_intake = time.monotonic() + self.config.intake_interval_s
        while True:
            if self._intake_enabled and time.monotonic() >= next_intake:
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
            signed = open_envelope(payload, self.aggregator_signing, MAX_ROUND_MESSAGE)
        except (TesseraError, ValueError) as error:
            log.warning(
                "message-rejected",
                extra={"fields": {"error": type(error).__name__}},
            )
            return
        message = signed.message
        if isinstance(message, RoundAbort):
            log.info(
                "round-aborted",
                extra={"fields": {"round": message.round, "reason": message.reason}},
            )
            return
        if not isinstance(message, RoundOpen):
            return
        try:
            self._rounds.put_nowait(("round", payload))
        except queue.Full:
            log.warning(
                "round-dropped",
                extra={"fields": {"round": message.round}},
            )

    def _on_candidate(self, _topic: str, payload: bytes) -> None:
        try:
            self._rounds.put_nowait(("candidate", payload))
        except queue.Full:
            log.warning("candidate-dropped", extra={"fields": {"reason": "worker busy"}})

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
                    "round-failed",
                    extra={"fields": {"error": type(error).__name__, "reason": str(error)}},
                )

    def _answer_round(self, payload: bytes) -> None:
        with self._lock:
            ctx = self._context()
        try:
            outcome = participate(payload, ctx)
        except AuthenticationError:
            log.warning(
                "message-rejected",
                extra={"fields": {"kind": "ROUND"}},
            )
            return
        round_number = outcome.round_open.round
        if not isinstance(outcome, Joined):
            self.metrics.round_refused(outcome.reason)
            log.warning(
                "round-refused",
                extra={
                    "fields": {
                        "round": round_number,
                        "reason": outcome.reason,
                        "detail": outcome.detail,
                    }
                },
            )
            return
        for message in outcome.messages:
            self.link.publish(message.topic, message.payload)
        self._joined[round_number] = outcome.round_open
        for old in sorted(self._joined)[:-JOINED_KEPT]:
            del self._joined[old]
        result = outcome.update.result
        self.metrics.round_joined()
        self.metrics.add_samples(result.train_samples)
        self.metrics.set_epsilon_spent(self.study.id, self.ledger.state().epsilon_spent)
        log.info(
            "round-joined",
            extra={
                "fields": {
                    "round": round_number,
                    "samples": result.train_samples,
                    "epsilon_round": outcome.epsilon_spent,
                    "epsilon_total": self.ledger.state().epsilon_spent,
                    "validation_loss": result.validation.loss,
                    "validation_accuracy": result.validation.accuracy,
                    "bytes_sent": sum(len(m.payload) for m in outcome.messages),
                    "plaintext_bytes": 4 * outcome.round_open.vector_length,
                }
            },
        )

    def _policy(self) -> SitePolicy:
        if self.config.policy is None:
            return SitePolicy(self.config.site_id, public_key_bytes(self.bundle.coordinator_key))
        policy = load_site_policy(self.config.policy)
        if policy.site_id != self.config.site_id or policy.coordinator_key != public_key_bytes(
            self.bundle.coordinator_key
        ):
            raise ConfigError(
                f"site policy {self.config.policy} is for site {policy.site_id!r} or pins "
                "another coordinator key than the bundle; fix the policy file"
            )
        return policy

    def _site_training(self) -> SiteTraining:
        training = self.config.training
        return SiteTraining(
            batch_size=training.batch_size,
            device=training.device,
            seed=training.seed,
            validation_fraction=training.validation_fraction,
            dp=training.dp(),
        )

    def _context(self) -> ParticipationContext:
        images, labels = self._training_data()
        return ParticipationContext(
            site_id=self.config.site_id,
            signing_key=self.signing_key,
            leader_id=self.bundle.roster.leader,
            aggregator_signing_keys=self.aggregator_signing,
            aggregator_hpke_keys=self.aggregator_hpke,
            manifest=self.manifest,
            approvals=load_approvals(self.config.approvals_path),
            policy=self._policy(),
            architecture=self.model_def.architecture,
            model=self.base,
            images=images,
            labels=labels,
            site=self._site_training(),
            ledger=self.ledger,
            audit=self.audit,
        )

    def _training_data(self) -> tuple[np.ndarray, np.ndarray]:
        try:
            data = CachedDataset(
                self.config.state_dir, self.preprocess, split="train", labelled_only=True
            )
        except NodeError:
            return _empty(self.model_def)
        if len(data) == 0:
            return _empty(self.model_def)
        if tuple(data.label_set) != tuple(self.study.labels):
            raise NodeError(
                f"the cache's label set {list(data.label_set)} is not the study's "
                f"{list(self.study.labels)}; ingest with the study's labels"
            )
        return data.stack()

    @property
    def _intake_enabled(self) -> bool:
        return self.config.dicom_dir is not None or self.config.receiver.enabled

    def _start_receiver(self) -> ThreadedAssociationServer:
        """The C-STORE receiver, writing to `self.received_dir` (checked writable first, so
        that a read-only volume fails at start, not at the PACS's first push)."""
        settings = self.config.receiver
        try:
            self.received_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            probe = self.received_dir / f"{TEMP_PREFIX}probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise ConfigError(
                f"[receiver] needs a writable {self.received_dir} ({error.strerror}); the "
                "state volume must be mounted read-write"
            ) from None
        return start_receiver(
            ReceiverConfig(
                intake_dir=self.config.state_dir,  # objects land in <state>/received
                state_dir=self.config.state_dir,
                host=settings.host,
                port=settings.port,
                ae_title=settings.ae_title,
                allowed_calling_aets=settings.calling_aets,
            )
        )

    def _ingest(self) -> None:
        from node.intake.ingest import IntakeConfig, run_ingest

        dicom_dir = self.config.dicom_dir
        cfg = IntakeConfig(
            intake_dir=dicom_dir if dicom_dir is not None else self.received_dir,
            received_dir=self.received_dir if dicom_dir is not None else None,
            state_dir=self.config.state_dir,
            preprocess=self.preprocess,
            limits=IntakeLimits(),
            label_set=self.study.labels,
            labels_csv=self.config.labels_csv,
            workers=self.config.intake_workers,
        )
        try:
            summary = run_ingest(cfg)
        except (TesseraError, OSError, ValueError) as error:
            log.error(
                "intake-failed",
                extra={"fields": {"error": type(error).__name__, "reason": str(error)}},
            )
            return
        for reason, count in summary.reasons.items():
            for _ in range(count):
                self.metrics.quarantine(reason)
        if summary.quarantined:
            self.audit.append("quarantine", {"count": summary.quarantined})
        log.info("intake", extra={"fields": {**summary.as_dict()}})

    # --- privacy audits of candidates ------------------------------------------------------

    def _audit_candidate(self, payload: bytes) -> None:
        """Audit the leader's candidate of a round this site joined; publish the signed
        report (see the module docstring). Anything else is logged and dropped."""
        fed, study = self.manifest.federation_id, self.study.id
        leader = self.bundle.roster.leader
        try:
            signed = open_envelope_as(
                payload, ModelRelease, self.aggregator_signing, DEFAULT_MAX_RELEASE_PAYLOAD
            )
            if signed.signer_id != leader:
                raise AuthenticationError("candidate is not from the federation's leader")
            candidate = signed.message
            require_fields(candidate, federation_id=fed, study_id=study)
            bundle = verify_candidate(candidate, leader, self.aggregator_signing[leader])
        except (TesseraError, ValueError) as error:
            log.warning("candidate-refused", extra={"fields": {"error": type(error).__name__}})
            return
        round_open = self._joined.get(candidate.round)
        if round_open is None:
            log.info("candidate-ignored", extra={"fields": {"round": candidate.round}})
            return  # not a round this site trained, or already audited (a redelivery)
        base = bytes(32) if round_open.model_version == 0 else round_open.base_model_hash
        if candidate.parent_hash != base:  # the first model's parent is 32 zero bytes
            log.warning("candidate-refused", extra={"fields": {"error": "not-from-our-base"}})
            return  # not the model this site's update went into
        del self._joined[candidate.round]  # audited once: a redelivered copy is ignored
        site = SiteData(self.config.site_id, fed, study, self.config.state_dir, self.preprocess)
        facts = {"study_id": study, "round": candidate.round, "version": candidate.version,
                 "model_hash": candidate.model_hash.hex()}  # fmt: skip
        try:
            target = candidate_target(candidate, bundle, self.model_def)
            recipe = round_train_config(round_open, self._site_training())
            report = audit_at_site(target, site, recipe, self.config.privacy_audit.budget())
        except (PrivacyAccountingError, NodeError) as error:
            outcome = "accounting-error" if isinstance(error, PrivacyAccountingError) else "failed"
            self.audit.append("privacy-audit", {**facts, "outcome": outcome, "detail": str(error)})
            log.error(
                "privacy-audit-failed",
                extra={"fields": {"round": candidate.round, "outcome": outcome,
                                  "reason": str(error)}},
            )  # fmt: skip
            return
        signed_report = sign_report(report, self.signing_key)
        figures = report.headline()
        self.audit.append("privacy-audit", {**facts, "outcome": "reported", **figures})
        self.link.publish(topics.audit_topic(fed, study, site.site_id), signed_report.to_json())
        log.info("privacy-audit", extra={"fields": {"round": candidate.round, **figures}})

    # --- releases and inference ------------------------------------------------------------

    def _on_release(self, _topic: str, payload: bytes) -> None:
        try:
            release = parse_release(payload, self.aggregator_signing, DEFAULT_MAX_RELEASE_PAYLOAD)
        except (TesseraError, ValueError) as error:
            log.warning(
                "release-refused",
                extra={"fields": {"error": type(error).__name__}},
            )
            return
        if is_signature_note(release):
            return  # a follower's signature for the leader, not a release
        with self._lock:
            try:
                record = accept_release(payload, self.aggregator_signing, self.store)
            except (AuthenticationError, ReleaseRefused) as error:
                log.warning(
                    "release-refused",
                    extra={
                        "fields": {
                            "version": release.version,
                            "reason": getattr(error, "reason", "not-verified"),
                        }
                    },
                )
                return
            self.base = self._newest_model()
            self._refresh_inference()
        log.info(
            "release-installed",
            extra={
                "fields": {
                    "version": record.version,
                    "round": record.round,
                    "serving": self.serving,
                }
            },
        )

    def _newest_model(self) -> TesseraNet:
        model = self.model_def.build()
        versions = self.store.versions()
        if versions:
            newest = versions[-1].version
            arrays = load_weights((self.store.folder(newest) / WEIGHTS_FILE).read_bytes())
            load_arrays(model, arrays)
        return model

    def _refresh_inference(self) -> None:
        version = self.store.current()
        if version is None or version == self.serving:
            return
        try:
            self.slot.swap(load_model(self.store.onnx_bytes(version)))
        except NodeError as error:  # a damaged or incompatible file: keep serving the old one
            log.error(
                "model-unusable", extra={"fields": {"version": version, "reason": str(error)}}
            )
            return
        self.serving = version
        record = self.store.get(version)
        assert record is not None
        self.metrics.set_model(version, bytes.fromhex(record.model_hash))
        log.info(
            "model-swapped",
            extra={"fields": {"version": version, "pinned": self.store.pinned is not None}},
        )

    def _infer(self, request: Request) -> Response:
        with self.metrics.time_inference() as timer:
            status, body = infer_request(self.slot, self.secret, IntakeLimits(), request.body)
            timer.outcome = "ok" if status == 200 else "rejected" if status == 400 else "error"
        return Response.json(status, body)

    def _count_wire(self, direction: str, count: int) -> None:
        self.metrics.add_wire_bytes("sent" if direction == "sent" else "received", count)


def _empty(model: StudyModel) -> tuple[np.ndarray, np.ndarray]:
    size, channels = model.image_size, model.spec.channels
    return np.zeros((0, channels, size, size), np.float32), np.zeros(0, np.int64)


def _site_bundle(config: NodeConfig) -> Bundle:
    bundle = load_bundle(config.bundle_dir)
    if bundle.role != "site" or bundle.member_id != config.site_id:
        raise ConfigError(
            f"bundle {config.bundle_dir} belongs to {bundle.member_id!r} ({bundle.role}); "
            f"mount site {config.site_id!r}'s own bundle"
        )
    return bundle


def _verified_manifest(config: NodeConfig, bundle: Bundle) -> Manifest:
    manifest = load_manifest(config.manifest_path)
    verify_manifest(manifest, public_key_bytes(bundle.coordinator_key))
    check_manifest_agrees(bundle.roster, manifest)
    return manifest


def _study(manifest: Manifest, study_id: str) -> Study:
    study = manifest.study(study_id)
    if study is None:
        known = ", ".join(s.id for s in manifest.studies)
        raise ConfigError(f"study_id = {study_id!r} is not in the manifest ({known})")
    return study


def _only(architectures: tuple[str, ...]) -> str:
    if len(architectures) != 1:
        raise ConfigError(
            f"the study allows {', '.join(architectures)}; set architecture in the node's "
            "configuration to choose one"
        )
    return architectures[0]


def run(config: NodeConfig) -> int:
    """Start the node and run it until SIGTERM/SIGINT; the exit status."""
    return run_until_signalled(NodeDaemon(config).start(), "node-stopped")
