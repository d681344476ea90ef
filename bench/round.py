"""Round benchmark: what secure aggregation costs in a whole round, and how the aggregator
scales with the number of nodes.

Run: .venv/bin/python bench/round.py [--quick] [--runs 3] [--counts 10,100,1000]

1. Secure round vs the same round in plaintext, 10 nodes, ResNet-18 (1 channel, 2 classes).
   One real Mosquitto (the provisioned configuration: mutual TLS, the generated ACL, MQTT v5,
   QoS 1), one `broker.service_link.ServiceLink` (Session + chunked send_payload /
   PayloadReceiver) per node and per aggregator, all in this process. Every node trains once
   (`node.training.federated.train_for_round` -> `node.training.trainer.run_local_round`, no DP, on
   synthetic 64x64 images), one after the other; the same trained update then feeds both
   variants, so training is identical and is reported on its own. Then, per timed run, the
   10 node threads start together (a barrier) and:
   - secure: `node.round.participation.seal_shares` (split, HPKE seal, signed Ed25519 envelope, one
     share per aggregator, S = 2) and publish both; each aggregator verifies the envelope,
     checks it against the round (`admission.check_share_envelope`), opens it
     (`admission.open_share`) and adds it (`ShareAccumulator` over a real `Store`); after the
     10th share it finalises, seals its partial sum to the other aggregator and publishes it
     (signed); each opens the other's partial (`partials.open_partial_sum`) and decodes the
     aggregate (`partials.combine_round`). Done when both aggregators hold the aggregate.
   - plaintext: each node publishes its update as raw float32 bytes to one aggregator, which
     adds it into a float64 sum. Done when the 10th is added.
   Not included in either: the RoundOpen, the ReceivedSet/ParticipantSet exchange (a few
   hundred bytes each), the strategy and the release, which are the same for both variants.
   The variants run interleaved after one warm-up pair; the table gives medians. The whole
   round is one node's training (the median; nodes train in parallel on their own machines)
   plus communication and aggregation. "agg wall/share" is the aggregator's handler time per
   received share (wall, while 10 node threads and TLS share the machine).
2. Aggregator CPU per round for 10, 100 and 1,000 simulated nodes with 1M parameters, and
3. aggregator peak memory for the same rounds. Each node count runs in fresh processes: the
   leader and the follower `aggregator.service.AggregatorService` each in its own spawned
   child (own Store, Registry, keys), and this process as the message loop between them
   (routing like the broker's ACL) and as the producer of the simulated nodes' signed share
   envelopes (tests/support/shares.py), made on the fly while the children work and not
   counted. Each child times only its own `on_message` / `open_round` calls with
   `getrusage` (user + sys), and reports its peak RSS (VmHWM; ru_maxrss of a spawned child
   starts at the parent's RSS) and, with --tracemalloc, the Python-level peak of the round.
   The round is complete: shares, agreement, partial sums, FedAvg, release
   with both signatures (the ONNX export is a stand-in digest, as in tests/aggregator).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import getpass
import hashlib
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from broker import topics
from tessera.crypto.sealing import generate_hpke_key
from tessera.crypto.signing import generate_signing_key
from tessera.limits import MAX_AGGREGATOR_MESSAGE_BYTES
from tessera.wire.envelopes import open_envelope_as, seal_envelope
from tessera.wire.messages import RoundOpen

FED, STUDY, LEADER = "bench-round", "bench-study", "agg-1"
AGGREGATORS = ("agg-1", "agg-2")
TARGET_FLAT = 0.20  # per-node CPU and peak memory within 20% of the 10-node run


def median(values: list[float]) -> float:
    return statistics.median(values)


# --- 1. secure round vs plaintext round, over Mosquitto ---------------------------------------


@dataclasses.dataclass
class NodeWork:
    """One node's trained update: the ring-encoded vector and the float32 one."""

    node: str
    encoded: np.ndarray
    plain: np.ndarray
    train_s: float


@dataclasses.dataclass(frozen=True)
class SealingIdentity:
    """What `seal_shares` reads from a ParticipationContext: the site, its key, the HPKE keys."""

    site_id: str
    signing_key: Ed25519PrivateKey
    aggregator_hpke_keys: Mapping[str, X25519PublicKey]


def train_nodes(
    n_nodes: int, arch: str, samples: int, size: int
) -> tuple[RoundOpen, list[NodeWork]]:
    """Train every node once (sequentially) for round 1 and return the round and the updates."""
    import copy

    from aggregator.config import RoundSettings
    from aggregator.leader import ring_for
    from node.training.federated import SiteTraining, train_for_round
    from tessera.crypto.update_layout import vector_length
    from tessera.models import ModelSpec, build_model
    from tessera.models.transfer import trainable_parameters
    from tessera.models.weights import model_hash, state_arrays

    model = build_model(ModelSpec(arch, channels=1, num_classes=2))
    n_params = sum(v.size for v in trainable_parameters(model).values())
    nodes = [f"site-{i:02d}" for i in range(n_nodes)]
    settings = RoundSettings(min_participants=2)
    round_open = RoundOpen(
        federation_id=FED, study_id=STUDY, round=1,
        base_model_hash=model_hash(state_arrays(model)), model_version=0,
        deadline_ms=int(time.time() * 1000) + 3_600_000, algorithm="fedavg",
        local_epochs=1, local_steps=0, learning_rate=settings.learning_rate, prox_mu=0.0,
        clip_norm=settings.clip_norm, ring=ring_for(settings, n_nodes), min_participants=2,
        vector_length=vector_length(n_params), aggregator_ids=AGGREGATORS,
        expected_nodes=tuple(nodes), leader_id=LEADER,
    )  # fmt: skip
    work = []
    for index, node in enumerate(nodes):
        rng = np.random.default_rng(index)  # synthetic inputs only
        images = rng.standard_normal((samples, 1, size, size)).astype(np.float32)
        labels = rng.integers(0, 2, samples)
        site = SiteTraining(batch_size=16, device="cpu", seed=index)
        start = time.perf_counter()
        update = train_for_round(round_open, copy.deepcopy(model), images, labels, site, None)
        spent = time.perf_counter() - start
        plain = update.update.values.astype(np.float32)
        work.append(NodeWork(node, update.encoded, plain, spent))
    return round_open, work


class Done:
    """Wall time at which `count` events have happened."""

    def __init__(self, count: int) -> None:
        self.count, self.at, self._event = count, 0.0, threading.Event()
        self._lock = threading.Lock()

    def hit(self) -> None:
        with self._lock:
            self.count -= 1
            if self.count == 0:
                self.at = time.perf_counter()
                self._event.set()

    def wait(self, timeout: float = 600) -> float:
        if not self._event.wait(timeout):
            raise TimeoutError("the round did not finish")
        return self.at


class SecureAggregator:
    """One aggregator's share and partial-sum handling for one round (no AggregatorService:
    the steps it calls, wired to MQTT directly)."""

    def __init__(self, me: str, bench: RoundBench, round_open: RoundOpen, store: Any) -> None:
        from aggregator.accumulator import ShareAccumulator
        from aggregator.admission import aggregator_index
        from tessera.wire.messages import ParticipantSet

        self.me, self.bench, self.round_open, self.store = me, bench, round_open, store
        self.accumulator = ShareAccumulator(
            federation_id=FED, study_id=STUDY, round_number=round_open.round,
            aggregator_index=aggregator_index(round_open, me), params=round_open.ring,
            length=round_open.vector_length, ledger=store,
        )  # fmt: skip
        self.set_hash = ParticipantSet(
            FED, STUDY, round_open.round, LEADER, round_open.expected_nodes
        ).digest()
        self.partials: dict[str, np.ndarray] = {}
        self.share_s = 0.0
        self.aggregate: np.ndarray | None = None
        self._lock = threading.Lock()

    def on_share(self, topic: str, payload: bytes) -> None:
        from aggregator.admission import check_share_envelope, open_share
        from aggregator.partials import seal_partial_sums
        from aggregator.rounds import Stage
        from tessera.wire.messages import ShareEnvelope

        start = time.perf_counter()
        b, a = self.bench, self.round_open
        envelope = open_envelope_as(
            payload, ShareEnvelope, b.node_public, MAX_AGGREGATOR_MESSAGE_BYTES
        ).message
        check_share_envelope(envelope, a, self.me, Stage.COLLECTING)
        share = open_share(envelope, a, self.me, b.hpke[self.me])
        digest = hashlib.sha256(envelope.sealed).digest()
        self.accumulator.add(envelope.node_id, share, envelope_digest=digest)
        self.share_s += time.perf_counter() - start
        if self.accumulator.count < len(a.expected_nodes):
            return
        partial = self.accumulator.finalize(a.expected_nodes)
        with self._lock:
            self.partials[self.me] = partial
        for message in seal_partial_sums(partial, a, self.me, self.set_hash, b.hpke_public):
            topic = topics.partial_topic(FED, STUDY, message.to_aggregator, self.me)
            b.links[self.me].publish(topic, seal_envelope(message, self.me, b.signing[self.me]))
        self._maybe_combine()

    def on_partial(self, topic: str, payload: bytes) -> None:
        from aggregator.partials import open_partial_sum
        from tessera.wire.messages import PartialSum

        b = self.bench
        message = open_envelope_as(
            payload, PartialSum, b.agg_public, MAX_AGGREGATOR_MESSAGE_BYTES
        ).message
        vector = open_partial_sum(message, self.round_open, self.me, b.hpke[self.me], self.set_hash)
        with self._lock:
            self.partials[message.from_aggregator] = vector
        self._maybe_combine()

    def _maybe_combine(self) -> None:
        from aggregator.partials import combine_round

        with self._lock:
            if len(self.partials) < len(AGGREGATORS) or self.aggregate is not None:
                return
            n = len(self.round_open.expected_nodes)
            self.aggregate = combine_round(self.partials, self.round_open, n)
        self.bench.done.hit()


class PlainAggregator:
    """The baseline: add raw float32 update vectors into a float64 sum."""

    def __init__(self, bench: RoundBench, length: int) -> None:
        self.bench, self.total, self.count = bench, np.zeros(length), 0
        self.share_s = 0.0

    def on_share(self, topic: str, payload: bytes) -> None:
        start = time.perf_counter()
        vector = np.frombuffer(payload, dtype="<f4")
        if vector.size != self.total.size:
            raise ValueError(f"{topic}: {vector.size} values, expected {self.total.size}")
        np.add(self.total, vector, out=self.total)
        self.count += 1
        self.share_s += time.perf_counter() - start
        if self.count == len(self.bench.nodes):
            self.bench.done.hit()


class RoundBench:
    """A provisioned federation on a real Mosquitto, with one link per member."""

    def __init__(self, root: Path, work: list[NodeWork], round_open: RoundOpen) -> None:
        from support.mosquitto import MosquittoProcess

        from broker.chunking import prepare_spool_dir
        from broker.provisioning.bundle import load_bundle
        from broker.provisioning.federation import parse_federation
        from broker.provisioning.provision import provision
        from broker.service_link import ServiceLink

        self.root, self.work, self.round_open = root, work, round_open
        self.nodes = [w.node for w in work]
        federation = parse_federation({
            "federation": {"id": FED, "leader": LEADER, "studies": [STUDY]},
            "broker": {"max_packet_bytes": 2 << 20},
            "sites": [{"id": n, "name": f"Hospital {n}"} for n in self.nodes],
            "aggregators": [{"id": a, "name": a} for a in AGGREGATORS],
        })  # fmt: skip
        provisioned = root / "provisioned"
        provision(federation, provisioned, run_as_user=getpass.getuser())
        self.broker = MosquittoProcess(federation, provisioned, root / "broker").start()
        self.signing = {m: generate_signing_key() for m in (*AGGREGATORS, *self.nodes)}
        self.hpke = {a: generate_hpke_key() for a in AGGREGATORS}
        self.hpke_public = {a: k.public_key() for a, k in self.hpke.items()}
        self.node_public = {n: self.signing[n].public_key() for n in self.nodes}
        self.agg_public = {a: self.signing[a].public_key() for a in AGGREGATORS}
        self.handlers: dict[str, Callable[[str, bytes], None]] = {}
        self.partial_handlers: dict[str, Callable[[str, bytes], None]] = {}
        self.links = {}
        for member in (*AGGREGATORS, *self.nodes):
            config = load_bundle(provisioned / "bundles" / member).session_config(
                self.broker.host, port=self.broker.mqtt_port
            )
            link = ServiceLink(config, spool_dir=prepare_spool_dir(root / "spool" / member))
            if member in AGGREGATORS:
                link.subscribe(
                    topics.shares_for_aggregator(FED, STUDY, member), self._route(member, False)
                )
                link.subscribe(
                    topics.partials_for_aggregator(FED, STUDY, member), self._route(member, True)
                )
            self.links[member] = link.start(connect_timeout_s=10)
        self.done = Done(0)

    def _route(self, member: str, partial: bool) -> Callable[[str, bytes], None]:
        def handle(topic: str, payload: bytes) -> None:
            table = self.partial_handlers if partial else self.handlers
            table[member](topic, payload)

        return handle

    def close(self) -> None:
        for link in self.links.values():
            link.close()
        self.broker.stop(graceful=False)

    def _run_nodes(self, prepare: Callable[[NodeWork], list[tuple[str, bytes]]]) -> float:
        """All node threads start together; return the start time."""
        barrier = threading.Barrier(len(self.work) + 1)
        errors: list[BaseException] = []

        def node(work: NodeWork) -> None:
            barrier.wait()
            try:
                for topic, payload in prepare(work):
                    self.links[work.node].publish(topic, payload)
            except BaseException as exc:  # noqa: BLE001 - reported by the caller
                errors.append(exc)

        threads = [threading.Thread(target=node, args=(w,)) for w in self.work]
        for thread in threads:
            thread.start()
        barrier.wait()
        start = time.perf_counter()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return start

    def secure(self, round_number: int, store: Any) -> dict[str, float]:
        from node.round.participation import ParticipationContext, seal_shares

        a = dataclasses.replace(self.round_open, round=round_number)
        aggs = {m: SecureAggregator(m, self, a, store[m]) for m in AGGREGATORS}
        for m, agg in aggs.items():
            self.handlers[m], self.partial_handlers[m] = agg.on_share, agg.on_partial
        self.done = Done(len(AGGREGATORS))

        def prepare(work: NodeWork) -> list[tuple[str, bytes]]:
            identity = SealingIdentity(work.node, self.signing[work.node], self.hpke_public)
            ctx = cast(ParticipationContext, identity)
            return [(o.topic, o.payload) for o in seal_shares(a, work.encoded, ctx)]

        start = self._run_nodes(prepare)
        end = self.done.wait()
        for m in AGGREGATORS:
            store[m].purge_shares(STUDY, round_number)
        expected = np.sum([w.plain.astype(np.float64) for w in self.work], axis=0)
        for agg in aggs.values():
            assert agg.aggregate is not None
            error = float(np.max(np.abs(agg.aggregate - expected)))
            assert error < 1e-3, f"secure aggregate is off by {error}"
        return {
            "round": end - start,
            "agg_share": max(agg.share_s for agg in aggs.values()),
        }

    def plaintext(self) -> dict[str, float]:
        agg = PlainAggregator(self, self.round_open.vector_length)
        self.handlers[LEADER] = agg.on_share
        self.done = Done(1)

        def prepare(work: NodeWork) -> list[tuple[str, bytes]]:
            return [(topics.share_topic(FED, STUDY, LEADER, work.node), work.plain.tobytes())]

        start = self._run_nodes(prepare)
        end = self.done.wait()
        expected = np.sum([w.plain.astype(np.float64) for w in self.work], axis=0)
        assert np.allclose(agg.total, expected)
        return {"round": end - start, "agg_share": agg.share_s}


def node_seal_time(bench: RoundBench) -> tuple[float, float]:
    """One node's seal_shares and float32 serialisation, best of 3, no contention."""
    from node.round.participation import ParticipationContext, seal_shares

    work = bench.work[0]
    ctx = cast(
        ParticipationContext,
        SealingIdentity(work.node, bench.signing[work.node], bench.hpke_public),
    )
    seal_s = plain_s = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        seal_shares(bench.round_open, work.encoded, ctx)
        seal_s = min(seal_s, time.perf_counter() - start)
        start = time.perf_counter()
        work.plain.tobytes()
        plain_s = min(plain_s, time.perf_counter() - start)
    return seal_s, plain_s


def round_part(args: argparse.Namespace) -> dict[str, float]:
    from aggregator.store import Store

    arch = "small-cnn" if args.quick else "resnet18"
    n_nodes = 3 if args.quick else args.nodes
    print(f"\n## 1. secure vs plaintext round: {n_nodes} nodes, {arch}, S = 2, TLS Mosquitto")
    start = time.perf_counter()
    round_open, work = train_nodes(n_nodes, arch, samples=args.samples, size=64)
    train = [w.train_s for w in work]
    length = round_open.vector_length
    ring = round_open.ring
    print(
        f"update vector {length:,} values, ring {ring.bits} bits (frac_bits {ring.frac_bits}); "
        f"float32 upload {length * 4 / 1e6:.1f} MB/node"
    )
    print(
        f"training ({args.samples} images 64x64, batch 16, 1 epoch, no DP, sequential): "
        f"per node median {median(train):.2f} s, max {max(train):.2f} s, "
        f"total {sum(train):.1f} s ({time.perf_counter() - start:.0f} s with setup)"
    )
    runs: dict[str, list[dict[str, float]]] = {"plain": [], "secure": []}
    with tempfile.TemporaryDirectory(prefix="bench-round-") as tmp:
        root = Path(tmp)
        bench = RoundBench(root, work, round_open)
        stores = {m: Store(root / m / "state.db", root / m / "shares") for m in AGGREGATORS}
        try:
            seal_s, plain_s = node_seal_time(bench)
            for step in range(args.runs + 1):
                plain = bench.plaintext()
                secure = bench.secure(step + 2, stores)
                if step:  # the first pair warms up
                    runs["plain"].append(plain)
                    runs["secure"].append(secure)
        finally:
            for store in stores.values():
                store.close()
            bench.close()
    plain_round = median([r["round"] for r in runs["plain"]])
    secure_round = median([r["round"] for r in runs["secure"]])
    # Every node has the same model and data size, so on its own machine each would take
    # the typical (median) time; the max here mostly shows load from other processes.
    train_node = median(train)
    print(f"\n{'variant':<10} {'comm+agg':>9} {'agg wall/share':>14} {'node prep':>10} "
          f"{'whole round':>12}")  # fmt: skip
    for name, round_s, rows, prep in (
        ("plaintext", plain_round, runs["plain"], plain_s),
        ("secure", secure_round, runs["secure"], seal_s),
    ):
        per_share = median([r["agg_share"] for r in rows]) / n_nodes
        print(
            f"{name:<10} {round_s:>8.2f}s {per_share * 1e3:>11.1f} ms {prep * 1e3:>7.0f} ms "
            f"{train_node + round_s:>11.2f}s"
        )
    all_runs = ", ".join(
        f"{p['round']:.2f}/{s['round']:.2f}"
        for p, s in zip(runs["plain"], runs["secure"], strict=True)
    )
    print(f"(median of {args.runs} interleaved runs after a warm-up; plain/secure s: {all_runs})")
    comm_ratio = secure_round / plain_round
    whole_ratio = (train_node + secure_round) / (train_node + plain_round)
    slowest = (max(train) + secure_round) / (max(train) + plain_round)
    pairs = zip(runs["plain"], runs["secure"], strict=True)
    paired = median([s["round"] / p["round"] for p, s in pairs])
    print(f"ratio secure / plaintext, comm+agg:    {comm_ratio:.2f}  (median of per-pair "
          f"ratios {paired:.2f})")  # fmt: skip
    print(
        f"ratio secure / plaintext, whole round: {whole_ratio:.2f}  (training = median node, "
        f"{train_node:.2f} s; with the slowest node's {max(train):.2f} s: {slowest:.2f})"
    )
    return {"comm": comm_ratio, "whole": whole_ratio}


# --- 2 and 3. aggregator CPU and memory vs node count -----------------------------------------


def _genesis(n_params: int) -> dict[str, np.ndarray]:
    return {"layer.weight": np.linspace(-1, 1, n_params, dtype=np.float32)}


def _fake_onnx(params: Mapping[str, np.ndarray], version: int) -> bytes:
    from aggregator.registry import weights_bytes

    return b"onnx-stand-in:%d:" % version + hashlib.sha256(weights_bytes(params)).digest()


def _status_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS now, VmHWM peak), in KiB.

    VmHWM, not ru_maxrss: a spawned child's ru_maxrss starts at the parent's RSS at fork
    time (Linux keeps the maximum across exec), which would hide the child's own peak.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def aggregator_child(conn: Connection, spec: dict[str, Any]) -> None:
    """An AggregatorService in a fresh process, driven over `conn`; times its own calls."""
    import tracemalloc

    from aggregator.config import AggregatorConfig, BrokerSettings, RoundSettings
    from aggregator.leader import StudyTerms
    from aggregator.registry import Registry
    from aggregator.service import AggregatorService, RosterKeys, ServiceKeys
    from aggregator.store import Store

    me, root = spec["me"], Path(spec["root"])
    roster = RosterKeys(
        aggregator_ids=AGGREGATORS,
        aggregator_signing={
            a: Ed25519PublicKey.from_public_bytes(b) for a, b in spec["agg_signing"].items()
        },
        aggregator_hpke={
            a: X25519PublicKey.from_public_bytes(b) for a, b in spec["agg_hpke"].items()
        },
        node_signing={n: Ed25519PublicKey.from_public_bytes(b) for n, b in spec["nodes"].items()},
    )
    config = AggregatorConfig(
        aggregator_id=me, federation_id=FED, study_id=STUDY, leader_id=LEADER,
        manifest=root / "manifest.json", signing_key=root / me / "signing.pem",
        hpke_key=root / me / "hpke.pem", state_dir=root / me, broker=BrokerSettings(tls=False),
        round=RoundSettings(min_participants=2, collect_timeout_s=3600),
    )  # fmt: skip
    store = Store(config.database_path, config.shares_dir)
    keys = ServiceKeys(
        Ed25519PrivateKey.from_private_bytes(spec["signing"]),
        X25519PrivateKey.from_private_bytes(spec["hpke"]),
    )
    service = AggregatorService(
        config, keys, roster, store, Registry(store, config.registry_dir), time.time,
        genesis=_genesis(spec["params"]), export_onnx=_fake_onnx,
        terms=StudyTerms(2, config.round.clip_norm, LEADER, tuple(sorted(spec["nodes"]))),
    )  # fmt: skip
    disk: int | None = None
    cpu: dict[str, float] = {}
    wall: dict[str, float] = {}
    share_cpu: list[tuple[float, float, bool]] = []  # (user, sys, full?) per share, in order
    profiler = cProfile.Profile() if spec["profile"] else None
    if profiler is not None:
        profiler.enable()
    calls: dict[str, int] = {}
    base_rss = _status_kib("VmRSS")
    if spec["tracemalloc"]:
        tracemalloc.start()
    conn.send("ready")
    while True:
        command, argument = conn.recv()
        if command == "stop":
            break
        if command == "stats":
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(f"{spec['profile']}-{me}.pstats")
            current = service.current
            traced = tracemalloc.get_traced_memory()[1] if tracemalloc.is_tracing() else 0
            conn.send({
                "cpu": cpu, "wall": wall, "calls": calls, "share_cpu": share_cpu,
                "base_rss_kib": base_rss,
                "peak_rss_kib": _status_kib("VmHWM"),
                "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                "traced_peak": traced, "disk": disk,
                "stage": None if current is None else current.state.stage.name,
                "held": None if current is None else current.state.received,
            })  # fmt: skip
            continue
        started = time.perf_counter()
        if command == "open":
            kind = "OPEN"
            start = resource.getrusage(resource.RUSAGE_SELF)
            out = service.open_round(tuple(argument))
        else:
            topic, payload = argument
            kind = topics.parse(topic).kind.name
            if disk is None and kind in ("PARTICIPANTS", "PARTIAL", "RELEASE"):
                # Shares are all in and not yet purged (the release deletes them).
                disk = sum(f.stat().st_size for f in config.shares_dir.rglob("*") if f.is_file())
            start = resource.getrusage(resource.RUSAGE_SELF)
            out = service.on_message(topic, payload)
        end = resource.getrusage(resource.RUSAGE_SELF)
        wall[kind] = wall.get(kind, 0.0) + time.perf_counter() - started
        user, system = end.ru_utime - start.ru_utime, end.ru_stime - start.ru_stime
        cpu[kind] = cpu.get(kind, 0.0) + user + system
        if kind == "SHARE":  # a seed share's envelope is a few hundred bytes
            share_cpu.append((user, system, len(argument[1]) > 65536))
        calls[kind] = calls.get(kind, 0) + 1
        del argument
        conn.send([(o.topic, o.payload) for o in out])
    store.close()


class Producer:
    """The simulated nodes: signed, sealed share envelopes, made one node at a time."""

    def __init__(self, n_nodes: int, n_params: int, hpke_public: Mapping[str, X25519PublicKey]):
        from support.shares import node_update

        from tessera.crypto.update_layout import pack_update

        self.nodes = tuple(f"site-{i:04d}" for i in range(n_nodes))
        self.keys = {n: generate_signing_key() for n in self.nodes}
        self.hpke_public = hpke_public
        # A few distinct update vectors; every node's shares are still its own (fresh seeds).
        self.vectors = [pack_update(*node_update(seed, n_params)) for seed in range(4)]
        self.seconds = 0.0

    def envelopes(self, announcement: RoundOpen, index: int) -> dict[str, tuple[str, bytes]]:
        from support.shares import node_envelopes

        start = time.perf_counter()
        node = self.nodes[index]
        vector = self.vectors[index % len(self.vectors)]
        out = {
            agg: (
                topics.share_topic(FED, STUDY, agg, node),
                seal_envelope(envelope, node, self.keys[node]),
            )
            for agg, envelope in node_envelopes(
                announcement, node, vector, self.hpke_public
            ).items()
        }
        self.seconds += time.perf_counter() - start
        return out


def scaling_case(
    n_nodes: int, n_params: int, tracemalloc_on: bool, profile: str | None
) -> dict[str, Any]:
    """One round over `n_nodes` simulated nodes; the two aggregators' own measurements."""
    signing = {a: generate_signing_key() for a in AGGREGATORS}
    hpke = {a: generate_hpke_key() for a in AGGREGATORS}
    hpke_public = {a: k.public_key() for a, k in hpke.items()}
    producer = Producer(n_nodes, n_params, hpke_public)
    started = time.perf_counter()
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bench-round-agg-") as tmp:
        conns: dict[str, Connection] = {}
        processes = []
        for agg in AGGREGATORS:
            spec = {
                "me": agg, "root": tmp, "params": n_params, "tracemalloc": tracemalloc_on,
                "profile": profile and f"{profile}-{n_nodes}",
                "signing": signing[agg].private_bytes_raw(), "hpke": hpke[agg].private_bytes_raw(),
                "agg_signing": {a: k.public_key().public_bytes_raw() for a, k in signing.items()},
                "agg_hpke": {a: k.public_bytes_raw() for a, k in hpke_public.items()},
                "nodes": {n: k.public_key().public_bytes_raw() for n, k in producer.keys.items()},
            }  # fmt: skip
            ours, theirs = context.Pipe()
            process = context.Process(target=aggregator_child, args=(theirs, spec))
            process.start()
            theirs.close()
            conns[agg], processes = ours, [*processes, process]
        for conn in conns.values():
            if conn.recv() != "ready":
                raise RuntimeError("aggregator child did not start")

        def deliver(outgoing: list[tuple[str, tuple[str, bytes]]]) -> None:
            """The broker: route every message (and every answer) like the ACL does."""
            queue = deque(outgoing)
            while queue:
                _sender, (topic, payload) = queue.popleft()
                parsed = topics.parse(topic)
                for agg, conn in conns.items():
                    if parsed.kind in (topics.Kind.SHARE, topics.Kind.PARTIAL) and (
                        parsed.aggregator != agg
                    ):
                        continue
                    conn.send(("msg", (topic, payload)))
                    queue.extend((agg, o) for o in conn.recv())

        conns[LEADER].send(("open", producer.nodes))
        opened = conns[LEADER].recv()
        agg_keys = {a: k.public_key() for a, k in signing.items()}
        announcement = open_envelope_as(
            opened[0][1], RoundOpen, agg_keys, MAX_AGGREGATOR_MESSAGE_BYTES
        ).message
        deliver([(LEADER, o) for o in opened])
        # Shares: node i's envelopes go out, node i+1's are made while the children work.
        upcoming = producer.envelopes(announcement, 0)
        for index in range(n_nodes):
            current = upcoming
            for agg, conn in conns.items():
                conn.send(("msg", current[agg]))
            if index + 1 < n_nodes:
                upcoming = producer.envelopes(announcement, index + 1)
            answers = [(agg, o) for agg, conn in conns.items() for o in conn.recv()]
            deliver(answers)
        stats = {}
        for agg, conn in conns.items():
            conn.send(("stats", None))
            stats[agg] = conn.recv()
        for conn in conns.values():
            conn.send(("stop", None))
        for process in processes:
            process.join(60)
        usage = shutil.disk_usage(tmp)
    return {
        "nodes": n_nodes,
        "stats": stats,
        "wall": time.perf_counter() - started,
        "producer": producer.seconds,
        "free_gb": usage.free / 1e9,
    }


def scaling_part(args: argparse.Namespace) -> dict[str, float]:
    counts = [10, 30] if args.quick else args.counts
    n_params = 100_000 if args.quick else args.params
    print(
        f"\n## 2-3. aggregator CPU and peak memory per round: {n_params:,} params, S = 2, "
        f"leader and follower AggregatorService in fresh processes"
    )
    print(f"disk before: {shutil.disk_usage(tempfile.gettempdir()).free / 1e9:.0f} GB free in "
          f"{tempfile.gettempdir()}")  # fmt: skip
    header = (
        f"{'nodes':>5} {'agg':>5} {'CPU/round':>10} {'per node':>9} {'ratio':>6} "
        f"{'shares/node':>11} {'fixed':>8} {'peak RSS':>9} {'round adds':>10} {'ratio':>6}"
    )
    if args.tracemalloc:
        header += f" {'traced':>9}"
    print(header)
    results = []
    base: dict[str, dict[str, float]] = {}
    worst = {"cpu": 0.0, "mem": 0.0}
    for n_nodes in counts:
        case = scaling_case(n_nodes, n_params, args.tracemalloc, args.profile)
        results.append(case)
        for agg in AGGREGATORS:
            s = case["stats"][agg]
            if s["stage"] != "RELEASED" or s["held"] != n_nodes:
                raise RuntimeError(f"{agg}: round ended {s['stage']} with {s['held']} shares")
            total = sum(s["cpu"].values())
            shares = s["cpu"].get("SHARE", 0.0)
            per_node = total / n_nodes
            peak_mib = s["peak_rss_kib"] / 1024
            grown_mib = (s["peak_rss_kib"] - s["base_rss_kib"]) / 1024
            ref = base.setdefault(agg, {"per_node": per_node, "peak": peak_mib})
            cpu_ratio, mem_ratio = per_node / ref["per_node"], peak_mib / ref["peak"]
            worst["cpu"] = max(worst["cpu"], abs(cpu_ratio - 1))
            worst["mem"] = max(worst["mem"], abs(mem_ratio - 1))
            line = (
                f"{n_nodes:>5} {agg:>5} {total:>9.2f}s {per_node * 1e3:>6.1f} ms "
                f"{cpu_ratio:>5.2f}x "
                f"{shares / n_nodes * 1e3:>8.1f} ms {(total - shares) * 1e3:>6.0f}ms "
                f"{peak_mib:>6.0f}MiB {grown_mib:>7.0f}MiB {mem_ratio:>5.2f}x"
            )
            if args.tracemalloc:
                line += f" {s['traced_peak'] / 2**20:>6.0f}MiB"
            print(line)
        disk = max(case["stats"][a]["disk"] for a in AGGREGATORS) / 1e9
        print(
            f"      (wall {case['wall']:.0f} s, of which making node envelopes "
            f"{case['producer']:.0f} s; share files before the release: {disk:.2f} GB "
            "per aggregator)"
        )
    print(
        "\nCPU per share by kind, ms: mean user + sys, and the median of the first -> last 10%"
        " of the round (a trend means per-share work grows as the round goes on)"
    )
    for case in results:
        for agg in AGGREGATORS:
            parts = []
            for label, full in (("full", True), ("seed", False)):
                rows = [(u, s) for u, s, f in case["stats"][agg]["share_cpu"] if f is full]
                if not rows:
                    continue
                total = [u + s for u, s in rows]
                tenth = max(1, len(rows) // 10)
                first, last = median(total[:tenth]), median(total[-tenth:])
                user = statistics.fmean(u for u, _ in rows)
                system = statistics.fmean(s for _, s in rows)
                parts.append(
                    f"{len(rows):>4} {label} {user * 1e3:5.2f} + {system * 1e3:5.2f} "
                    f"({first * 1e3:5.2f} -> {last * 1e3:5.2f})"
                )
            print(f"  {case['nodes']:>5} nodes {agg}: {'   '.join(parts)}")
    for what in ("cpu", "wall"):
        print(f"\n{what.upper()} time by message kind (s, leader / follower):")
        for case in results:
            kinds = sorted({k for a in AGGREGATORS for k in case["stats"][a][what]})
            parts = ", ".join(
                f"{k} " + "/".join(f"{case['stats'][a][what].get(k, 0.0):.2f}" for a in AGGREGATORS)
                for k in kinds
            )
            print(f"  {case['nodes']:>5} nodes: {parts}")
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run (about a minute)")
    parser.add_argument("--runs", type=int, default=3, help="timed round pairs (part 1)")
    parser.add_argument("--nodes", type=int, default=10, help="nodes in part 1")
    parser.add_argument("--samples", type=int, default=40, help="training images per node")
    parser.add_argument("--counts", type=lambda s: [int(x) for x in s.split(",")],
                        default=[10, 100, 1000], help="node counts for parts 2-3")  # fmt: skip
    parser.add_argument("--params", type=int, default=1_000_000, help="parameters (parts 2-3)")
    parser.add_argument("--part", choices=("all", "round", "aggregator"), default="all")
    parser.add_argument("--profile", help="parts 2-3: write cProfile stats to PREFIX-N-agg")
    parser.add_argument(
        "--tracemalloc", action="store_true", help="also trace Python allocations (slower CPU)"
    )
    args = parser.parse_args()
    if args.quick:
        args.runs = 1
    started = time.perf_counter()
    print(
        f"round benchmark: {os.cpu_count()} cores, python {sys.version.split()[0]}, "
        f"numpy {np.__version__}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    summary = []
    if args.part in ("all", "round"):
        ratios = round_part(args)
        summary.append(f"secure / plaintext: comm+agg {ratios['comm']:.2f}, "
                       f"whole round {ratios['whole']:.2f}")  # fmt: skip
    if args.part in ("all", "aggregator"):
        worst = scaling_part(args)
        for name, key in (("CPU per node", "cpu"), ("peak memory", "mem")):
            met = "MET" if worst[key] <= TARGET_FLAT else "MISSED"
            summary.append(
                f"{name} flat within 20% of the 10-node run: worst {worst[key] * 100:.0f}%  {met}"
            )
    print("\n## summary")
    for line in summary:
        print(line)
    print(
        f"(load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"total {time.perf_counter() - started:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
