"""AggregatorService end to end in one process: a leader and a follower, four simulated nodes
with real sharing, HPKE and Ed25519 envelopes, wired by a tiny in-memory message loop that
routes like the broker's ACL (shares and partial sums only to their addressee).

The ONNX exporter is a deterministic stand-in (a digest of the weights): the export itself
is tested in tests/tessera/test_onnx_export.py; here it only has to be the same bytes at
both aggregators, which the release signatures then cover."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import pytest

from aggregator.config import AggregatorConfig, BrokerSettings, RoundSettings
from aggregator.errors import AggregatorConfigError
from aggregator.leader import StudyTerms
from aggregator.privacy_gate import AuditSetup
from aggregator.registry import Registry, load_weights, weights_bytes
from aggregator.rounds import Stage
from aggregator.service import AggregatorService, Outgoing, RosterKeys, ServiceKeys
from aggregator.store import Store
from broker import topics
from tessera.crypto.flatten import flatten
from tessera.crypto.sealing import generate_hpke_key
from tessera.crypto.signing import generate_signing_key
from tessera.crypto.update_layout import pack_update
from tessera.governance.audit import AuditLog
from tessera.limits import RELEASE_REFETCH_INTERVAL_S
from tessera.observability.events import Event
from tessera.wire.envelopes import open_envelope, seal_envelope
from tessera.wire.messages import (
    ModelRelease,
    ReceiptSet,
    ReleaseRequest,
    RoundAbort,
    RoundOpen,
    ShareEnvelope,
)
from tessera.wire.release import verify_release
from tests.support import governance
from tests.support.shares import node_envelopes, node_update

FED, STUDY, LEADER = "fed-1", "study-1", "agg-1"
AGGREGATORS = ("agg-1", "agg-2")
NODES = ("site-a", "site-b", "site-c", "site-d")
GENESIS = {
    "layer.weight": np.linspace(-1, 1, 40, dtype=np.float32).reshape(4, 10),
    "layer.bias": np.zeros(4, dtype=np.float32),
}
N_PARAMS = 44
EPSILON = {node: 0.5 + i for i, node in enumerate(NODES)}  # what each node's shares state
TERMS = StudyTerms(min_participants=2, clip_norm=1.0, leader_id=LEADER, sites=NODES)


def fake_onnx(params: Mapping[str, np.ndarray], version: int) -> bytes:
    return b"onnx-stand-in:%d:" % version + hashlib.sha256(weights_bytes(params)).digest()


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Federation:
    """Two services, the nodes' keys, and the message loop between them."""

    def __init__(self, root: Path, audit_limit: float | None = None) -> None:
        """With `audit_limit`, the study requires a privacy audit with that TPR limit, and the
        keys come from a signed manifest (`self.governance`) that says so."""
        self.clock = Clock()
        signing = {a: generate_signing_key() for a in AGGREGATORS}
        hpke = {a: generate_hpke_key() for a in AGGREGATORS}
        self.node_keys = {n: generate_signing_key() for n in NODES}
        self.governance: governance.Federation | None = None
        if audit_limit is not None:
            self.governance = gov = governance.build_federation(
                root / "governance", federation_id=FED, site_ids=list(NODES),
                aggregator_ids=list(AGGREGATORS),
                study={"id": STUDY, "privacy_audit": {"max_tpr_at_0_1pct_fpr": audit_limit}},
            )  # fmt: skip
            signing = {a: gov.keys[a] for a in AGGREGATORS}
            hpke = {a: gov.hpke_keys[a] for a in AGGREGATORS}
            self.node_keys = {n: gov.keys[f"node-{n}"] for n in NODES}
        self.hpke_public = {a: k.public_key() for a, k in hpke.items()}
        self.agg_public = {a: k.public_key() for a, k in signing.items()}
        roster = RosterKeys(
            aggregator_ids=AGGREGATORS,
            aggregator_signing=self.agg_public,
            aggregator_hpke=self.hpke_public,
            node_signing={n: k.public_key() for n, k in self.node_keys.items()},
        )
        self.services: dict[str, AggregatorService] = {}
        for agg in AGGREGATORS:
            config = AggregatorConfig(
                aggregator_id=agg,
                federation_id=FED,
                study_id=STUDY,
                leader_id=LEADER,
                manifest=root / "manifest.json",
                signing_key=root / agg / "signing.pem",
                hpke_key=root / agg / "hpke.pem",
                state_dir=root / agg,
                broker=BrokerSettings(tls=False),
                round=RoundSettings(min_participants=3, collect_timeout_s=60, frac_bits=24),
            )
            store = Store(config.database_path, config.shares_dir, clock=self.clock)
            audit = None
            if self.governance is not None:
                (root / agg).mkdir(parents=True, exist_ok=True)
                log = AuditLog.open(root / agg / "audit.log")
                audit = AuditSetup(self.governance.manifest, log)
            self.services[agg] = AggregatorService(
                config,
                ServiceKeys(signing[agg], hpke[agg]),
                roster,
                store,
                Registry(store, config.registry_dir),
                self.clock,
                genesis=GENESIS,
                export_onnx=fake_onnx,
                terms=TERMS,
                audit=audit,
            )
        self.wire: list[Outgoing] = []
        self.lost: list[Outgoing] = []
        self.newest_first = False

    def deliver(
        self, outgoing: Iterable[Outgoing], drop: Callable[[Outgoing], bool] = lambda o: False
    ) -> None:
        """Publish, and keep delivering whatever the services answer, in order (newest
        first when `self.newest_first`); messages `drop` picks are lost on the way (kept in
        `self.lost`)."""
        queue = deque(outgoing)
        while queue:
            out = queue.pop() if self.newest_first else queue.popleft()
            if drop(out):
                self.lost.append(out)
                continue
            self.wire.append(out)
            topic = topics.parse(out.topic)
            for agg, service in self.services.items():
                if (
                    topic.kind in (topics.Kind.SHARE, topics.Kind.PARTIAL)
                    and topic.aggregator != agg
                ):
                    continue  # the broker's ACL: only the addressee reads it
                queue.extend(service.on_message(out.topic, out.payload))

    def announcement(self) -> RoundOpen:
        current = self.services[LEADER].current
        assert current is not None
        return current.announcement

    def shares(self, node: str, seed: int) -> tuple[np.ndarray, dict[str, Outgoing]]:
        """One node's update (delta, weight, loss packed) and its signed share per aggregator."""
        a = self.announcement()
        delta, weight, loss = node_update(seed, N_PARAMS)
        vector = pack_update(delta, weight, loss)
        envelopes = node_envelopes(a, node, vector, self.hpke_public, EPSILON[node])
        return np.array([*delta * weight, weight]), {
            agg: self.signed_share(env, node) for agg, env in envelopes.items()
        }

    def signed_share(self, envelope: ShareEnvelope, node: str) -> Outgoing:
        payload = seal_envelope(envelope, node, self.node_keys[node])
        return Outgoing(topics.share_topic(FED, STUDY, envelope.aggregator_id, node), payload)

    def published_to_sites(self, agg: str) -> ReceiptSet:
        """The one ReceiptSet `agg` published (its receipts for the sites)."""
        (receipts,) = [
            message
            for out, message in self.published(ReceiptSet, on=(topics.Kind.RECEIPTS,))
            if out.topic == topics.receipts_topic(FED, STUDY, agg)
        ]
        assert isinstance(receipts, ReceiptSet)
        return receipts

    def held(self, agg: str) -> tuple[str, ...]:
        service = self.services[agg]
        assert service.current is not None
        return service.store.held_nodes(STUDY, service.current.state.round)

    def stage(self, agg: str) -> Stage:
        current = self.services[agg].current
        assert current is not None
        return current.state.stage

    def past_deadline(
        self, drop: Callable[[Outgoing], bool] = lambda o: False, extra_s: float = 1
    ) -> None:
        self.clock.now = self.announcement().deadline_ms / 1000 + extra_s
        for service in self.services.values():
            self.deliver(service.tick(), drop)

    def published(
        self,
        kind: type,
        on: tuple[topics.Kind, ...] = (topics.Kind.ROUND, topics.Kind.RELEASE),
    ) -> list[tuple[Outgoing, object]]:
        keys = {**self.agg_public}
        out = []
        for item in self.wire:
            if topics.parse(item.topic).kind in on:
                message = open_envelope(item.payload, keys, 1 << 30).message
                if isinstance(message, kind):
                    out.append((item, message))
        return out


def events(caplog: pytest.LogCaptureFixture, event: Event) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == event]


def run_round(
    fed: Federation,
    skip: set[tuple[str, str]],
    drop: Callable[[Outgoing], bool] = lambda o: False,
) -> dict[str, np.ndarray]:
    """Open a round, send every node's shares except `skip` (node, aggregator) pairs."""
    fed.deliver(fed.services[LEADER].open_round(NODES))
    clear = {}
    for seed, node in enumerate(NODES):
        clear[node], outgoing = fed.shares(node, seed)
        fed.deliver((out for agg, out in outgoing.items() if (node, agg) not in skip), drop)
    return clear


def test_a_full_round_releases_one_model_signed_by_both(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    fed = Federation(tmp_path)
    fed.deliver(fed.services[LEADER].open_round(NODES))
    assert fed.stage("agg-2") is Stage.COLLECTING  # the follower verified the RoundOpen

    clear = {}
    for seed, node in enumerate(NODES):
        clear[node], outgoing = fed.shares(node, seed)
        if node == "site-a":  # a second, different share from the same node: first wins
            _, again = fed.shares(node, 99)
            fed.deliver([outgoing["agg-1"], again["agg-1"], outgoing["agg-1"]])
            fed.deliver([outgoing["agg-2"]])
            assert len(events(caplog, Event.SHARE_DUPLICATE)) == 2
            continue
        # site-d reaches only the leader, so it is left out
        fed.deliver(out for agg, out in outgoing.items() if (node, agg) != ("site-d", "agg-2"))
    assert fed.held("agg-1") == NODES
    assert fed.stage("agg-1") is Stage.AGREEING  # every expected node reported
    assert fed.stage("agg-2") is Stage.COLLECTING
    fed.past_deadline()

    for agg in AGGREGATORS:
        assert fed.stage(agg) is Stage.RELEASED
        current = fed.services[agg].current
        assert current is not None and current.state.participants == NODES[:3]  # not site-d
    (note_out, note), (final_out, final) = fed.published(ModelRelease)
    assert isinstance(note, ModelRelease) and isinstance(final, ModelRelease)
    # the follower's signature note: no payload, its one signature, not retained
    assert note.payload == b"" and [s for s, _ in note.signatures] == ["agg-2"]
    assert not note_out.retain and final_out.retain
    assert {s for s, _ in final.signatures} == set(AGGREGATORS)
    verify_release(final, fed.agg_public)

    versions = [fed.services[a].registry.latest(STUDY) for a in AGGREGATORS]
    assert versions[0] is not None and versions[1] is not None
    assert versions[0].record.model_hash == versions[1].record.model_hash == final.model_hash
    weights = [v.weights_path.read_bytes() for v in versions]
    assert weights[0] == weights[1]
    assert versions[0].card == versions[1].card
    assert versions[0].card["participants"]["count"] == 3
    # epsilon per site, as each participant's signed shares stated it (site-d left out)
    assert versions[0].card["privacy"]["epsilon_per_site"] == {n: EPSILON[n] for n in NODES[:3]}

    agreed = [clear[n] for n in ("site-a", "site-b", "site-c")]
    total = np.sum(agreed, axis=0)
    mean_delta = total[:-1] / total[-1]
    new, _ = flatten(load_weights(weights[0]))
    base, _ = flatten(GENESIS)
    np.testing.assert_allclose(new - base, mean_delta, atol=1e-5)


def test_fewer_than_k_aborts_with_a_reason_and_releases_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fed = Federation(tmp_path)
    run_round(fed, skip={("site-c", "agg-2"), ("site-d", "agg-2")})
    fed.past_deadline()
    ((abort_out, abort),) = fed.published(RoundAbort)
    assert isinstance(abort, RoundAbort) and abort_out.retain
    assert "fewer than the minimum k=3" in abort.reason and "site" not in abort.reason
    for agg in AGGREGATORS:
        assert fed.stage(agg) is Stage.ABORTED
        assert fed.services[agg].registry.latest(STUDY) is None
    assert not fed.published(ModelRelease)
    assert not [o for o in fed.wire if topics.parse(o.topic).kind is topics.Kind.PARTIAL]


def test_forged_misrouted_and_replayed_shares_are_rejected_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    fed = Federation(tmp_path)
    run_round(fed, skip=set())
    fed.past_deadline()
    assert fed.stage("agg-2") is Stage.RELEASED
    old = [o for o in fed.wire if topics.parse(o.topic).kind is topics.Kind.SHARE]

    fed.deliver(fed.services[LEADER].open_round(NODES))
    assert fed.stage("agg-2") is Stage.COLLECTING  # round 2 opened on the released model
    leader = fed.services[LEADER]
    _, fresh = fed.shares("site-a", 7)
    mallory = generate_signing_key()
    envelope = open_envelope(fresh["agg-1"].payload, fed.services[LEADER].signers, 1 << 30)
    assert isinstance(envelope.message, ShareEnvelope)
    tampered = bytearray(fresh["agg-1"].payload)
    tampered[-80] ^= 1
    topic = fresh["agg-1"].topic
    attempts = [
        (topic, old[0].payload),  # replay of round 1
        (topic, seal_envelope(envelope.message, "site-a", mallory)),  # forged signature
        (topic, bytes(tampered)),  # changed in transit
        (topic, fresh["agg-2"].payload),  # topic and message disagree
        (fresh["agg-2"].topic, fresh["agg-2"].payload),  # the broker routed it wrongly
        (topic, b"not an envelope"),
    ]
    for where, payload in attempts:
        assert leader.on_message(where, payload) == []
    rejected = events(caplog, Event.MESSAGE_REJECTED)
    assert [r.fields["error"] for r in rejected] == [  # type: ignore[attr-defined]
        "AuthenticationError",
        "AuthenticationError",
        "AuthenticationError",
        "MessageRejected",
        "ShareRejected",
        "CodecError",
    ]
    assert "round differs" in rejected[0].fields["reason"]  # type: ignore[attr-defined]
    assert "addressed to 'agg-2'" in rejected[4].fields["reason"]  # type: ignore[attr-defined]
    assert fed.held("agg-1") == ()
    fed.deliver([fresh["agg-1"]])
    assert fed.held("agg-1") == ("site-a",)


def kind_of(out: Outgoing) -> topics.Kind:
    return topics.parse(out.topic).kind


def test_a_round_open_not_signed_by_the_leader_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fed = Federation(tmp_path)
    genuine = fed.services[LEADER].open_round(NODES)
    (announcement,) = [o for o in genuine if kind_of(o) is topics.Kind.ROUND]
    message = open_envelope(announcement.payload, fed.agg_public, 1 << 20).message
    assert isinstance(message, RoundOpen)
    # a key on the roster, naming itself leader of a round it made up
    usurper = dataclasses.replace(message, leader_id="site-a", aggregator_ids=("site-a", "agg-2"))
    forged = seal_envelope(usurper, "site-a", fed.node_keys["site-a"])
    follower = fed.services["agg-2"]
    assert follower.on_message(announcement.topic, forged) == []
    assert follower.current is None
    (rejected,) = events(caplog, Event.MESSAGE_REJECTED)
    assert "the leader is 'agg-1'" in rejected.fields["reason"]  # type: ignore[attr-defined]
    fed.deliver(genuine)
    assert fed.stage("agg-2") is Stage.COLLECTING


def test_a_lost_received_set_aborts_at_the_agreement_timeout(tmp_path: Path) -> None:
    fed = Federation(tmp_path)
    run_round(fed, skip={("site-d", "agg-2")})

    def lost(out: Outgoing) -> bool:
        return kind_of(out) is topics.Kind.RECEIVED

    fed.past_deadline(drop=lost)
    assert fed.lost and fed.stage("agg-1") is Stage.AGREEING
    timeout = fed.services[LEADER].config.round.agreement_timeout_s
    fed.past_deadline(extra_s=timeout + 1)
    ((_, abort),) = fed.published(RoundAbort)
    assert isinstance(abort, RoundAbort) and "agreement timeout" in abort.reason
    assert fed.stage("agg-1") is Stage.ABORTED and fed.stage("agg-2") is Stage.ABORTED
    assert not fed.published(ModelRelease)


def test_a_bad_signature_note_is_refused_and_the_genuine_one_completes_the_release(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fed = Federation(tmp_path)

    def note(out: Outgoing) -> bool:
        return kind_of(out) is topics.Kind.RELEASE

    run_round(fed, skip=set(), drop=note)  # everyone reports: no deadline needed
    (held,) = fed.lost
    genuine = open_envelope(held.payload, fed.agg_public, 1 << 20).message
    assert isinstance(genuine, ModelRelease)
    bad = dataclasses.replace(genuine, signatures=(("agg-2", bytes(64)),))
    other = dataclasses.replace(genuine, version=genuine.version + 1)
    for message in (bad, other):
        payload = seal_envelope(message, "agg-2", fed.services["agg-2"].keys.signing)
        assert fed.services[LEADER].on_message(held.topic, payload) == []
    assert fed.stage("agg-1") is Stage.COMBINING
    assert [r.fields["error"] for r in events(caplog, Event.MESSAGE_REJECTED)] == [  # type: ignore[attr-defined]
        "AuthenticationError",
        "AuthenticationError",
    ]
    fed.deliver([held])
    assert fed.stage("agg-1") is Stage.RELEASED and fed.stage("agg-2") is Stage.RELEASED


def test_messages_that_overtake_each_other_still_give_one_release(tmp_path: Path) -> None:
    """Newest first: the leader's partial sum reaches the follower before the participant
    set, and the follower's signature note can reach the leader before its own release."""
    fed = Federation(tmp_path)
    fed.newest_first = True
    run_round(fed, skip={("site-d", "agg-2")})
    fed.past_deadline()
    order = [kind_of(o) for o in fed.wire]
    assert order.index(topics.Kind.PARTIAL) < order.index(topics.Kind.PARTICIPANTS)
    to_leader = [i for i, o in enumerate(fed.wire) if topics.parse(o.topic).aggregator == LEADER]
    assert order.index(topics.Kind.RELEASE) < to_leader[-1]  # the note came first
    for agg in AGGREGATORS:
        assert fed.stage(agg) is Stage.RELEASED
    versions = [fed.services[a].registry.latest(STUDY) for a in AGGREGATORS]
    assert versions[0] and versions[1]
    assert versions[0].record.model_hash == versions[1].record.model_hash


def test_ids_shared_by_a_node_and_an_aggregator_are_refused(tmp_path: Path) -> None:
    fed = Federation(tmp_path)
    service = fed.services["agg-2"]
    roster = dataclasses.replace(
        service.roster,
        node_signing={**service.roster.node_signing, "agg-1": fed.agg_public["agg-1"]},
    )
    with pytest.raises(AggregatorConfigError, match=r"\['agg-1'\] name both"):
        AggregatorService(
            service.config,
            service.keys,
            roster,
            service.store,
            service.registry,
            fed.clock,
            genesis=GENESIS,
            export_onnx=fake_onnx,
            terms=TERMS,
        )


def test_a_node_asking_again_for_a_release_gets_it_alone_and_not_on_demand(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue #19, point 6: a node holding a release damaged asks for it again; every
    aggregator that registered it sends the signed release to that node's copy topic, at most
    once a minute per node and version; a request in another site's name or for a version
    never released is refused."""
    fed = Federation(tmp_path)
    run_round(fed, skip=set())
    fed.past_deadline()
    latest = fed.services[LEADER].registry.latest(STUDY)
    assert latest is not None
    release = latest.release_path.read_bytes()

    def ask(node: str, version: int = 1, on: str = "site-a") -> list[Outgoing]:
        request = ReleaseRequest(FED, STUDY, latest.record.round, node, version)
        payload = seal_envelope(request, node, fed.node_keys[node])
        topic = topics.fetch_topic(FED, STUDY, on)
        return [out for s in fed.services.values() for out in s.on_message(topic, payload)]

    caplog.set_level(logging.INFO)
    answers = ask("site-a")
    assert [(o.topic, o.payload, o.retain) for o in answers] == [
        (topics.release_copy_topic(FED, STUDY, "site-a"), release, False)
    ] * len(AGGREGATORS)
    verify_release(ModelRelease.from_bytes(answers[0].payload), fed.agg_public)
    assert ask("site-a") == []  # within the interval: nothing more
    fed.clock.now += RELEASE_REFETCH_INTERVAL_S
    assert len(ask("site-a")) == len(AGGREGATORS)
    assert ask("site-b", on="site-a") == []  # site-b's request on site-a's topic: refused
    assert ask("site-a", version=7) == []  # never released: refused
    rejected = [r.fields["reason"] for r in events(caplog, Event.MESSAGE_REJECTED)]  # type: ignore[attr-defined]
    assert len(rejected) == 2 * len(AGGREGATORS)
    assert "another" in rejected[0] and "version 7" in rejected[-1]
