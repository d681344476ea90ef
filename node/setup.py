"""`tessera node run`'s start-up: what `node.daemon` wires, built from a NodeConfig.

`load_node_setup(config)` runs steps 1 and 2 of the daemon's start-up, each failing with a
message that names the fix: the member's bundle, verified manifest, study and model
(`broker.provisioning.member.load_member`), this site's signing key, then under `state_dir`
the spool folder (0700) for large transfers, the audit log (counts only), the model store,
the privacy ledger and the site secret, and the metrics. `NodeSetup` then builds what each
round, audit and intake pass needs from them: the site policy (re-read every time), the
training settings and data, the round and candidate contexts, the MQTT link, the C-STORE
receiver and one intake pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry
from pynetdicom.transport import ThreadedAssociationServer

from broker.chunking import prepare_spool_dir
from broker.provisioning.member import MemberSetup, load_member
from broker.service_link import Endpoint, ServiceLink, WireCounter, endpoint_config
from node.config import NodeConfig
from node.errors import NodeError
from node.inference.runtime import preprocess_from_metadata
from node.intake.cache import CachedDataset
from node.intake.phi import load_or_create_site_secret
from node.intake.preprocess import PreprocessConfig
from node.intake.receiver import start_receiver
from node.intake.receiver_store import RECEIVED_DIR
from node.intake.screen import REASONS as QUARANTINE_REASONS
from node.intake.screen import IntakeLimits
from node.intake.worker import TEMP_PREFIX
from node.privacy.ledger import PrivacyLedger, ledger_path
from node.privacy.site_audit import SiteData
from node.round.candidate import CandidateContext, JoinedRounds
from node.round.participation import PROTOCOL_REASONS, ParticipationContext
from node.round.policy import REASONS, SitePolicy, load_site_policy
from node.round.releases import ModelStore
from node.training.federated import SiteTraining
from tessera.crypto.signing import public_key_bytes
from tessera.errors import ConfigError
from tessera.governance.approvals import load_approvals
from tessera.governance.audit import AuditLog
from tessera.limits import MAX_RELEASE_PAYLOAD_BYTES
from tessera.models.nets import TesseraNet
from tessera.models.study import StudyModel
from tessera.models.weights import load_arrays, load_weights
from tessera.observability.metrics import ServiceMetrics

if TYPE_CHECKING:
    from node.intake.ingest import IngestSummary

AUDIT_FILE = "audit.log"
SPOOL_DIR = "spool"  # under state_dir: where the MQTT link reassembles large transfers


def study_preprocess(model: StudyModel) -> PreprocessConfig:
    """The preprocessing the study's terms fix (its other terms are the model's concern)."""
    return preprocess_from_metadata(dict(model.preprocess))


@dataclass(frozen=True, eq=False)
class NodeSetup:
    """A node's parts before anything listens: see the module docstring."""

    config: NodeConfig
    member: MemberSetup
    preprocess: PreprocessConfig
    signing_key: Ed25519PrivateKey
    audit: AuditLog
    store: ModelStore
    ledger: PrivacyLedger
    secret: bytes
    metrics_registry: CollectorRegistry
    metrics: ServiceMetrics

    @property
    def model_def(self) -> StudyModel:
        """The model the study trains, in the configured (or only allowed) architecture."""
        return self.member.model

    @property
    def received_dir(self) -> Path:
        """Where the C-STORE receiver writes: `<state_dir>/received`."""
        return self.config.state_dir / RECEIVED_DIR

    @property
    def intake_enabled(self) -> bool:
        """Whether there is DICOM to ingest: a DICOM folder, or the receiver's."""
        return self.config.dicom_dir is not None or self.config.receiver.enabled

    # --- rounds and audits -----------------------------------------------------------------

    def policy(self) -> SitePolicy:
        """The site policy, re-read from its file for every round (see `site_policy`)."""
        return site_policy(self.config, self.member)

    def site_training(self) -> SiteTraining:
        """What the site decides about training, from `[training]`."""
        training = self.config.training
        return SiteTraining(
            batch_size=training.batch_size,
            device=training.device,
            seed=training.seed,
            validation_fraction=training.validation_fraction,
            dp=training.dp(),
        )

    def training_data(self) -> tuple[np.ndarray, np.ndarray]:
        """The cache's labelled train split; empty arrays before anything was ingested."""
        model = self.model_def
        try:
            data = CachedDataset(
                self.config.state_dir, self.preprocess, split="train", labelled_only=True
            )
        except NodeError:
            return _empty(model)
        if len(data) == 0:
            return _empty(model)
        labels = self.member.study.labels
        if tuple(data.label_set) != tuple(labels):
            raise NodeError(
                f"the cache's label set {list(data.label_set)} is not the study's "
                f"{list(labels)}; ingest with the study's labels"
            )
        return data.stack()

    def model_at(self, version: int | None) -> TesseraNet:
        """The model of an accepted `version` (weights re-checked against its hash:
        `node.round.releases.ModelFileDamaged` if they are damaged), or the study's genesis
        model for None."""
        model = self.model_def.build()
        if version is not None:
            load_arrays(model, load_weights(self.store.weights_bytes(version)))
        return model

    def participation_context(self, base: TesseraNet) -> ParticipationContext:
        """What `participate` needs for one RoundOpen, with `base` as the model to train."""
        images, labels = self.training_data()
        member = self.member
        return ParticipationContext(
            site_id=self.config.site_id,
            signing_key=self.signing_key,
            leader_id=member.leader,
            aggregator_signing_keys=member.aggregator_signing,
            aggregator_hpke_keys=member.aggregator_hpke,
            manifest=member.manifest,
            approvals=load_approvals(self.config.approvals_path),
            policy=self.policy(),
            architecture=self.model_def.architecture,
            model=base,
            images=images,
            labels=labels,
            site=self.site_training(),
            ledger=self.ledger,
            audit=self.audit,
        )

    def candidate_context(self, joined: JoinedRounds) -> CandidateContext:
        """What `audit_candidate` needs, with `joined` the rounds this node would audit."""
        member, config = self.member, self.config
        site = SiteData(config.site_id, member.manifest.federation_id, member.study.id,
                        config.state_dir, self.preprocess)  # fmt: skip
        return CandidateContext(
            site=site,
            leader_id=member.leader,
            aggregator_signing_keys=member.aggregator_signing,
            signing_key=self.signing_key,
            model=self.model_def,
            training=self.site_training(),
            budget=config.privacy_audit.budget(),
            joined=joined,
            audit=self.audit,
        )

    # --- transport and intake --------------------------------------------------------------

    def link(self, on_wire: WireCounter) -> ServiceLink:
        """The MQTT link (not started), spooling under `<state_dir>/spool` (made private at
        start-up by `load_node_setup`)."""
        broker = self.config.broker
        endpoint = Endpoint(
            broker.host, broker.port, broker.tls, broker.publish_timeout_s, broker.reconnect_max_s
        )
        return ServiceLink(
            endpoint_config(self.member.bundle, endpoint),
            spool_dir=self.config.state_dir / SPOOL_DIR,
            max_payload_bytes=MAX_RELEASE_PAYLOAD_BYTES,
            on_wire=on_wire,
        )

    def start_receiver(self) -> ThreadedAssociationServer:
        """The C-STORE receiver, writing to `received_dir` (checked writable first, so that a
        read-only volume fails at start, not at the PACS's first push)."""
        settings, received = self.config.receiver, self.received_dir
        try:
            received.mkdir(mode=0o700, parents=True, exist_ok=True)
            probe = received / f"{TEMP_PREFIX}probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise ConfigError(
                f"[receiver] needs a writable {received} ({error.strerror}); the "
                "state volume must be mounted read-write"
            ) from None
        state = self.config.state_dir
        return start_receiver(settings.receiver_config(state, audit_log=state / AUDIT_FILE))

    def ingest(self) -> IngestSummary:
        """One intake pass over the DICOM folder and the received folder (or the received
        folder alone), deleting received originals once cached (`[receiver]
        retention_hours`); raises what the intake raises (TesseraError, OSError, ValueError)."""
        from node.intake.ingest import IntakeConfig, run_ingest

        config = self.config
        return run_ingest(
            IntakeConfig(
                intake_dir=config.dicom_dir,
                received_dir=self.received_dir,
                received_retention_s=config.receiver.retention_hours * 3600,
                state_dir=config.state_dir,
                preprocess=self.preprocess,
                limits=IntakeLimits(),
                label_set=self.member.study.labels,
                labels_csv=config.labels_csv,
                workers=config.intake_workers,
            )
        )


def load_node_setup(config: NodeConfig) -> NodeSetup:
    """Steps 1 and 2 of the node's start-up (see the module docstring)."""
    member = load_member(
        config.bundle_dir,
        role="site",
        member_id=config.site_id,
        manifest_path=config.manifest_path,
        study_id=config.study_id,
        architecture=config.architecture,
    )
    preprocess = study_preprocess(member.model)
    signing_key = member.bundle.signing_key()
    state, study = config.state_dir, member.study
    state.mkdir(parents=True, exist_ok=True)
    prepare_spool_dir(state / SPOOL_DIR)  # a release above the spool threshold lands there
    audit = AuditLog.open(state / AUDIT_FILE, counts_only=True)
    store = ModelStore(state, member.manifest.federation_id, study.id, audit)
    ledger = PrivacyLedger(
        ledger_path(state, study.id),
        study.id,
        site_policy(config, member).max_epsilon or study.dp.epsilon,
        study.dp.delta,
        config.training.accountant,
    )
    secret = load_or_create_site_secret(state)
    registry = CollectorRegistry()
    metrics = ServiceMetrics(
        registry,
        refusal_reasons=(*REASONS, *PROTOCOL_REASONS),
        quarantine_reasons=QUARANTINE_REASONS,
    )
    return NodeSetup(config, member, preprocess, signing_key, audit, store, ledger, secret,
                     registry, metrics)  # fmt: skip


def site_policy(config: NodeConfig, member: MemberSetup) -> SitePolicy:
    """The site policy, read from its file now (the study's terms alone without one); it
    must be this site's and pin the bundle's coordinator key."""
    coordinator = public_key_bytes(member.bundle.coordinator_key)
    if config.policy is None:
        return SitePolicy(config.site_id, coordinator)
    policy = load_site_policy(config.policy)
    if policy.site_id != config.site_id or policy.coordinator_key != coordinator:
        raise ConfigError(
            f"site policy {config.policy} is for site {policy.site_id!r} or pins "
            "another coordinator key than the bundle; fix the policy file"
        )
    return policy


def _empty(model: StudyModel) -> tuple[np.ndarray, np.ndarray]:
    size, channels = model.image_size, model.spec.channels
    return np.zeros((0, channels, size, size), np.float32), np.zeros(0, np.int64)
