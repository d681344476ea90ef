"""Attack 6 of issue 18: a curious broker must not learn a hospital's cohort size.

A site's composed epsilon is a deterministic function of its training-set size, so it must
never cross the broker in clear. A real node (real DICOM intake, real DP-SGD training, real
ledger) answers a signed RoundOpen; what it publishes goes through a real Mosquitto over TLS
to the two aggregators, and every chunk frame the broker relayed is kept. No relayed byte may
hold the epsilon (as a big- or little-endian binary64, or as text), no parsed ShareEnvelope
may have an epsilon field, and each aggregator still reads the exact epsilon, sealed to it.
"""

from __future__ import annotations

import struct
import threading
from pathlib import Path

import pytest
from support.mosquitto import MosquittoProcess, SessionFactory

from broker import topics
from broker.chunking import ChunkFrame
from broker.transfer import send_payload
from node.privacy.ledger import PrivacyLedger
from node.round.participation import Joined, ParticipationContext, participate
from node.round.policy import SitePolicy
from node.training.federated import SiteTraining
from node.training.trainer import DPSettings
from tessera.crypto.encoding import derive_ring_params
from tessera.crypto.update_layout import required_bound, vector_length
from tessera.governance.audit import AuditLog
from tessera.models.transfer import apply_transfer_mode, trainable_parameters
from tessera.models.weights import model_hash, state_arrays
from tessera.wire.envelopes import open_envelope_as, seal_envelope
from tessera.wire.messages import RoundOpen, ShareEnvelope
from tests.support.governance import NOW, STUDY_ID, build_federation
from tests.support.models import ingested_site, small_model

FED, SITE, AGGREGATORS = "fed-test", "site-a", ("agg-1", "agg-2")


class Frames:
    """Every raw frame delivered on the subscribed filters, as the broker relayed it."""

    def __init__(self) -> None:
        self.raw: list[bytes] = []
        self._changed = threading.Condition()

    def __call__(self, topic: str, payload: bytes) -> None:
        with self._changed:
            self.raw.append(payload)
            self._changed.notify_all()

    def wait_for(self, count: int, timeout: float) -> list[bytes]:
        with self._changed:
            self._changed.wait_for(lambda: len(self.raw) >= count, timeout)
        return list(self.raw)


def encodings(value: float) -> list[bytes]:
    """The ways a float may sit in bytes: binary64 either way round, and as text."""
    return [struct.pack(">d", value), struct.pack("<d", value), repr(value).encode()]


def test_no_byte_the_broker_relays_reveals_the_sites_epsilon(
    mosquitto: MosquittoProcess, connect: SessionFactory, tmp_path: Path
) -> None:
    gov = build_federation(
        tmp_path / "gov", federation_id=FED, site_ids=[SITE, "site-b"],
        aggregator_ids=list(AGGREGATORS),
    )  # fmt: skip
    data = ingested_site(tmp_path / "site", images_per_site=16)
    model, _ = small_model()
    apply_transfer_mode(model, "head")
    ledger = PrivacyLedger(tmp_path / "privacy.json", STUDY_ID, 8.0, 1e-5)
    ctx = ParticipationContext(
        site_id=SITE, signing_key=gov.keys[f"node-{SITE}"], leader_id="agg-1",
        aggregator_signing_keys={a: gov.keys[a].public_key() for a in AGGREGATORS},
        aggregator_hpke_keys={a: gov.hpke_keys[a].public_key() for a in AGGREGATORS},
        manifest=gov.manifest, approvals=[gov.approvals[SITE][STUDY_ID]],
        policy=SitePolicy(site_id=SITE, coordinator_key=gov.coordinator_public),
        architecture="small-cnn-v1", model=model, images=data.images, labels=data.labels,
        site=SiteTraining(batch_size=4, dp=DPSettings(1.0, 1.0)), ledger=ledger,
        audit=AuditLog.open(tmp_path / "audit.log", counts_only=True),
    )  # fmt: skip
    n = sum(v.size for v in trainable_parameters(model).values())
    announced = RoundOpen(
        federation_id=FED, study_id=STUDY_ID, round=1,
        base_model_hash=model_hash(state_arrays(model)), model_version=1,
        deadline_ms=int(NOW.timestamp() * 1000) + 3_600_000, algorithm="fedavg",
        local_epochs=1, local_steps=0, learning_rate=0.05, prox_mu=0.0, clip_norm=1.0,
        ring=derive_ring_params(required_bound(1.0), max_participants=16), min_participants=2,
        vector_length=vector_length(n), aggregator_ids=AGGREGATORS,
        expected_nodes=(SITE, "site-b"), leader_id="agg-1", weight_cap=100,
    )  # fmt: skip
    result = participate(seal_envelope(announced, "agg-1", gov.keys["agg-1"]), ctx, NOW)
    assert isinstance(result, Joined)
    epsilon = ledger.spent
    assert epsilon > 0

    # The node's publications cross a real Mosquitto; each aggregator's subscription sees
    # the frames the broker relays to it, which together are everything the node sent.
    relayed = Frames()
    for agg in AGGREGATORS:
        connect(agg, mosquitto).subscribe(topics.shares_for_aggregator(FED, STUDY_ID, agg), relayed)
    node = connect(SITE, mosquitto)
    for message in result.messages:
        send_payload(node, message.topic, message.payload, timeout_s=60)
    frames = relayed.wait_for(len(result.messages), timeout=60)
    assert len(frames) == len(result.messages)  # each share fits one frame here
    sent = [message.payload for message in result.messages]
    # One subscription per aggregator, each on its own connection: either frame may come first.
    assert sorted(bytes(ChunkFrame.from_bytes(raw).data) for raw in frames) == sorted(sent)

    for raw in frames:
        for encoded in encodings(epsilon):
            assert encoded not in raw, "the broker relays the site's epsilon in clear"
    node_keys = {SITE: gov.keys[f"node-{SITE}"].public_key()}
    for payload in sent:
        envelope = open_envelope_as(payload, ShareEnvelope, node_keys, 1 << 24).message
        assert not [name for name in vars(envelope) if "epsilon" in name]

    # ... and yet each aggregator reads the exact epsilon, sealed to it alone.
    from tessera.wire.statement import open_statement

    for payload in sent:
        envelope = open_envelope_as(payload, ShareEnvelope, node_keys, 1 << 24).message
        agg = envelope.aggregator_id
        statement = open_statement(envelope, announced, gov.hpke_keys[agg])
        assert statement.epsilon_total == pytest.approx(epsilon, rel=0, abs=0)
