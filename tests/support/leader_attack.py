"""A federation in which the leader lies: real AggregatorService objects with real keys, real
node participation (real policy, real DP training on ingested synthetic DICOM, real HPKE and
Ed25519), and an attacker that holds the leader's signing and HPKE keys.

The governance is a signed manifest with four sites and two aggregators (`agg-1` leads);
the study's k is 2, each aggregator's own k is 3. Every node trains the same small model on
the same ingested images (the attacker's RoundOpens ask for one FedSGD step, which keeps a
trained share cheap); what matters here is what each party checks, not what it learns.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.config import AggregatorConfig, BrokerSettings, RoundSettings
from aggregator.leader import StudyTerms
from aggregator.partials import open_partial_sum
from aggregator.registry import Registry, weights_bytes
from aggregator.service import AggregatorService, Outgoing, RosterKeys, ServiceKeys
from aggregator.store import Store
from broker import topics
from node.privacy.ledger import PrivacyLedger
from node.round.participation import Participation, ParticipationContext, participate
from node.round.policy import SitePolicy
from node.training.federated import SiteTraining
from node.training.trainer import DPSettings
from tessera.crypto.encoding import derive_ring_params
from tessera.crypto.sealing import open_sealed
from tessera.crypto.sharing import Share, ShareContext, add_into, expand
from tessera.crypto.signing import sign_envelope
from tessera.crypto.update_layout import required_bound, vector_length
from tessera.governance.audit import AuditLog, read_entries
from tessera.models.transfer import trainable_parameters
from tessera.models.weights import model_hash, state_arrays
from tessera.wire.envelopes import Message, _header, open_envelope, seal_envelope, share_binding
from tessera.wire.messages import PartialSum, ParticipantSet, RoundOpen, ShareEnvelope
from tests.support.governance import NOW, STUDY_ID, Federation, build_federation
from tests.support.models import IngestedSite, small_model

LEADER, FOLLOWER = "agg-1", "agg-2"
AGGREGATORS = (LEADER, FOLLOWER)
SITES = ("site-1", "site-2", "site-3", "site-4")
STUDY_K, FOLLOWER_K = 2, 3
NOW_MS = int(NOW.timestamp() * 1000)


def fake_onnx(params: Mapping[str, np.ndarray], version: int) -> bytes:
    """A deterministic stand-in for the ONNX export (tested in tests/tessera)."""
    return b"onnx-stand-in:%d:" % version + hashlib.sha256(weights_bytes(params)).digest()


class Clock:
    def __init__(self) -> None:
        self.now = NOW.timestamp()

    def __call__(self) -> float:
        return self.now


class LyingLeaderFederation:
    """The real follower (and the real leader service, whose keys the attacker uses), real
    nodes, and the attacker's tools: sign anything as the leader, open what the leader can."""

    def __init__(self, root: Path, data: IngestedSite) -> None:
        self.root, self.data = root, data
        self.gov: Federation = build_federation(
            root / "gov", site_ids=list(SITES), aggregator_ids=list(AGGREGATORS),
            study={"min_participants": STUDY_K},
        )  # fmt: skip
        self.clock = Clock()
        self.model, _ = small_model()  # every parameter trains, as the aggregators expect
        self.genesis = state_arrays(self.model)
        self.roster = RosterKeys(
            aggregator_ids=AGGREGATORS,
            aggregator_signing={a: self.gov.keys[a].public_key() for a in AGGREGATORS},
            aggregator_hpke={a: self.gov.hpke_keys[a].public_key() for a in AGGREGATORS},
            node_signing={s: self.gov.keys[f"node-{s}"].public_key() for s in SITES},
        )
        self.services = {agg: self.service(agg) for agg in AGGREGATORS}
        self.nodes = {site: self.node(site) for site in SITES}

    # --- the parties ---------------------------------------------------------------------

    def config(self, agg: str) -> AggregatorConfig:
        k = FOLLOWER_K  # both aggregators' own k; the study's is lower
        return AggregatorConfig(
            aggregator_id=agg, federation_id=self.gov.manifest.federation_id,
            study_id=STUDY_ID, leader_id=LEADER, manifest=self.gov.manifest_path,
            signing_key=self.root / agg / "signing.pem", hpke_key=self.root / agg / "hpke.pem",
            state_dir=self.root / agg, broker=BrokerSettings(tls=False),
            round=RoundSettings(min_participants=k, collect_timeout_s=600, weight_cap=100),
        )  # fmt: skip

    def service(self, agg: str, store: Store | None = None) -> AggregatorService:
        """A real service for `agg`, on a new store or (a restart) on `store`."""
        config = self.config(agg)
        store = store or Store(config.database_path, config.shares_dir, clock=self.clock)
        return AggregatorService(
            config, ServiceKeys(self.gov.keys[agg], self.gov.hpke_keys[agg]), self.roster,
            store, Registry(store, config.registry_dir), self.clock, genesis=self.genesis,
            export_onnx=fake_onnx, terms=StudyTerms(STUDY_K, 1.0, LEADER, SITES),
        )  # fmt: skip

    def restart(self, agg: str) -> AggregatorService:
        """What `tessera aggregator run` does after a kill: recover the store, start afresh."""
        store = self.services[agg].store
        store.recover()
        self.services[agg] = self.service(agg, store)
        return self.services[agg]

    def node(self, site: str, **changes: Any) -> ParticipationContext:
        state = self.root / "nodes" / site
        state.mkdir(parents=True, exist_ok=True)
        ctx = ParticipationContext(
            site_id=site, signing_key=self.gov.keys[f"node-{site}"], leader_id=LEADER,
            aggregator_signing_keys=dict(self.roster.aggregator_signing),
            aggregator_hpke_keys=dict(self.roster.aggregator_hpke),
            manifest=self.gov.manifest, approvals=[self.gov.approvals[site][STUDY_ID]],
            policy=SitePolicy(site_id=site, coordinator_key=self.gov.coordinator_public),
            architecture="small-cnn-v1", model=self.model, images=self.data.images,
            labels=self.data.labels, site=SiteTraining(batch_size=4, dp=DPSettings(1.0, 1.0)),
            ledger=PrivacyLedger(state / "privacy.json", STUDY_ID, 8.0, 1e-5),
            audit=AuditLog.open(state / "audit.log", counts_only=True),
        )  # fmt: skip
        return dataclasses.replace(ctx, **changes)

    # --- the attacker's tools ------------------------------------------------------------

    def round_open(self, **changes: Any) -> RoundOpen:
        """A RoundOpen as an honest leader would plan it, with `changes` (the lies)."""
        n = sum(v.size for v in trainable_parameters(self.model).values())
        expected = changes.get("expected_nodes", SITES)
        fields: dict[str, Any] = dict(
            federation_id=self.gov.manifest.federation_id, study_id=STUDY_ID, round=1,
            base_model_hash=model_hash(self.genesis), model_version=0,
            deadline_ms=NOW_MS + 600_000, algorithm="fedsgd", local_epochs=0, local_steps=1,
            learning_rate=0.05, prox_mu=0.0, clip_norm=1.0,
            ring=derive_ring_params(required_bound(1.0), len(expected), 16),
            min_participants=FOLLOWER_K, vector_length=vector_length(n),
            aggregator_ids=AGGREGATORS, expected_nodes=SITES, leader_id=LEADER, weight_cap=100,
        )  # fmt: skip
        fields.update(changes)
        return RoundOpen(**fields)

    def as_leader(self, message: Message, check: bool = True) -> bytes:
        """`message` in an envelope signed with the leader's key (the attacker holds it);
        `check=False` also signs a message that names another sender, as a liar would."""
        if check:
            return seal_envelope(message, LEADER, self.gov.keys[LEADER])
        header = _header(LEADER, len(body := message.to_bytes()))
        return b"".join((header, body, sign_envelope(self.gov.keys[LEADER], header, body)))

    def round_topic(self) -> str:
        return topics.round_topic(self.gov.manifest.federation_id, STUDY_ID)

    def participants(self, round_number: int, node_ids: Iterable[str]) -> Outgoing:
        """A ParticipantSet signed by the leader, on its topic."""
        fed = self.gov.manifest.federation_id
        message = ParticipantSet(fed, STUDY_ID, round_number, LEADER, tuple(sorted(node_ids)))
        return Outgoing(topics.participants_topic(fed, STUDY_ID), self.as_leader(message))

    # --- moving messages -----------------------------------------------------------------

    def answer(self, site: str, announcement: RoundOpen, now: dt.datetime = NOW) -> Participation:
        """The node's real answer to the leader-signed `announcement`."""
        return participate(self.as_leader(announcement, check=False), self.nodes[site], now)

    def to(self, agg: str, outgoing: Iterable[Outgoing]) -> list[Outgoing]:
        """Deliver to `agg` what the broker's ACL lets it read; everything it answers."""
        answered: list[Outgoing] = []
        for out in outgoing:
            topic = topics.parse(out.topic)
            if topic.kind in (topics.Kind.SHARE, topics.Kind.PARTIAL) and topic.aggregator != agg:
                continue
            answered.extend(self.services[agg].on_message(out.topic, out.payload))
        return answered

    def deliver(self, outgoing: Iterable[Outgoing]) -> list[Outgoing]:
        """Route among both services, as the broker's ACL would, until nobody answers;
        every message that went over the wire, in order."""
        queue, wire = deque(outgoing), []
        while queue:
            out = queue.popleft()
            wire.append(out)
            for agg in AGGREGATORS:
                queue.extend(self.to(agg, [out]))
        return wire

    def open_message(self, out: Outgoing) -> Message:
        keys = {**self.roster.aggregator_signing, **self.roster.node_signing}
        return open_envelope(out.payload, keys, 1 << 30).message

    def partial_sums(self, outgoing: Iterable[Outgoing]) -> list[PartialSum]:
        """The partial sums among `outgoing`."""
        found = [self.open_message(o) for o in outgoing if kind(o) is topics.Kind.PARTIAL]
        return [m for m in found if isinstance(m, PartialSum)]

    def leader_share(self, announcement: RoundOpen, share: Outgoing, site: str) -> np.ndarray:
        """The leader's share of `site`'s update, opened with the leader's HPKE key and
        expanded: what the attacker adds to the follower's partial sum."""
        envelope = self.open_message(share)
        assert isinstance(envelope, ShareEnvelope) and envelope.aggregator_id == LEADER
        a = announcement
        plain = open_sealed(envelope.sealed, self.gov.hpke_keys[LEADER],
                            share_binding(a, site, LEADER))  # fmt: skip
        parsed = Share.from_bytes(plain, a.aggregator_ids.index(LEADER), a.ring, a.vector_length)
        ctx = ShareContext(a.federation_id, a.study_id, a.round, site)
        return expand(parsed, ctx, a.vector_length, a.ring)

    def recover(
        self, announcement: RoundOpen, partial: PartialSum, shares: Iterable[np.ndarray]
    ) -> np.ndarray:
        """What the attacker reconstructs: the follower's partial sum plus its own shares."""
        opened = open_partial_sum(partial, announcement, LEADER, self.gov.hpke_keys[LEADER],
                                  partial.participant_set_hash)  # fmt: skip
        total = opened.copy()
        for share in shares:
            add_into(total, share)
        return total


def kind(out: Outgoing) -> topics.Kind:
    return topics.parse(out.topic).kind


def audit_reasons(ctx: ParticipationContext) -> list[tuple[str, object]]:
    """(kind, reason) of every entry of the node's audit log, oldest first."""
    return [(e.kind, e.fields.get("reason")) for e in read_entries(ctx.audit.path)]
