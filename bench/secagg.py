"""Secure-aggregation core: node and aggregator throughput, as ratios to memcpy.

Run: .venv/bin/python bench/secagg.py

The baseline is `np.copyto` of the same float32 bytes, measured in the same process just
before each case. Every time is the best of a few repeats (the fastest run is the one
least disturbed by other processes on a shared machine).

- Node: encode + split + seal every share (HPKE to each aggregator), for 1M and 11M
  float32 parameters with S = 2 and 3. Sealing takes each share's `plaintext()` view, the
  zero-copy form of `to_bytes()`; the to_bytes variant and the full signed envelope are
  shown too, for information.
- Aggregator: open (HPKE) + parse + expand + sum, over every share one aggregator gets in a
  round, for 10 nodes (11M params) and 100 nodes (1M params), S = 2. Per-share GB/s is the
  float32 size of one update divided by the time to process one share; seed shares and
  full shares are also timed apart, and the signed-envelope path is shown for information.
- Upload: bytes of all signed share envelopes a node publishes / float32 bytes of its update.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from tessera.crypto.encoding import RingParams, derive_ring_params, encode
from tessera.crypto.sealing import SealBinding, generate_hpke_key, open_sealed, seal
from tessera.crypto.sharing import Share, ShareContext, accumulate, split
from tessera.crypto.signing import generate_signing_key
from tessera.wire.envelopes import open_envelope_as, seal_envelope
from tessera.wire.messages import ShareEnvelope
from tessera.wire.statement import SEALED_STATEMENT_BYTES

TARGET_NODE_GBPS = 0.5
TARGET_AGGREGATOR_GBPS = 0.5
TARGET_UPLOAD_RATIO = 1.1
FEDERATION, STUDY, ROUND = "bench-fed", "bench-study", 3
BASE_MODEL = hashlib.sha256(b"bench base model").digest()
ANNOUNCEMENT = hashlib.sha256(b"bench round open").digest()  # stands for RoundOpen.digest()
PARAMS = derive_ring_params(bound=1.0, max_participants=1000, frac_bits=16)


def best_of(action: Callable[[], Any], repeats: int) -> float:
    """Fastest wall time of `repeats` runs, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - start)
    return best


def copy_baseline(nbytes: int) -> float:
    source = np.ones(nbytes // 4, dtype=np.float32)
    target = np.empty_like(source)
    return best_of(lambda: np.copyto(target, source), 7)


def binding(node: str, aggregator: str, params: RingParams) -> SealBinding:
    return SealBinding(
        "share",
        FEDERATION,
        STUDY,
        ROUND,
        ANNOUNCEMENT,
        BASE_MODEL,
        node,
        aggregator,
        params.to_bytes(),
    )


class Federation:
    """Keys for S aggregators and one signing key per node, as provisioning would make."""

    def __init__(self, n_aggregators: int) -> None:
        self.aggregators = [f"agg-{i}" for i in range(n_aggregators)]
        self.hpke = [generate_hpke_key() for _ in self.aggregators]
        self.node_keys: dict[str, Any] = {}

    def node_key(self, node: str) -> Any:
        if node not in self.node_keys:
            self.node_keys[node] = generate_signing_key()
        return self.node_keys[node]

    def sealed_shares(self, x: np.ndarray, node: str, copy: bool = False) -> list[bytes]:
        """What the node does: encode, split, seal one share per aggregator."""
        ctx = ShareContext(FEDERATION, STUDY, ROUND, node)
        shares = split(encode(x, PARAMS), len(self.aggregators), ctx, PARAMS)
        return [
            seal(
                share.to_bytes() if copy else share.plaintext(),
                key.public_key(),
                binding(node, aggregator, PARAMS),
            )
            for share, key, aggregator in zip(shares, self.hpke, self.aggregators, strict=True)
        ]

    def envelopes(self, x: np.ndarray, node: str) -> list[bytes]:
        """The signed share envelopes a node publishes."""
        sealed = self.sealed_shares(x, node)
        return [
            seal_envelope(
                ShareEnvelope(
                    FEDERATION,
                    STUDY,
                    ROUND,
                    BASE_MODEL,
                    node,
                    aggregator,
                    PARAMS,
                    x.size,
                    box,
                    bytes(SEALED_STATEMENT_BYTES),  # its size only: sealing it is ~50 us
                ),
                node,
                self.node_key(node),
            )
            for aggregator, box in zip(self.aggregators, sealed, strict=True)
        ]


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def node_side(federation_sizes: tuple[int, ...], lengths: tuple[int, ...]) -> dict[str, float]:
    rng = np.random.default_rng(0)  # update values only; masks come from os.urandom
    worst_node, worst_upload = float("inf"), 0.0
    print("\n## node: encode + split + seal all shares")
    print(f"{'params':>7} {'S':>2} {'memcpy':>9} {'node':>9} {'ratio':>6}  breakdown")
    for length in lengths:
        x = rng.uniform(-1, 1, length).astype(np.float32)
        for n_aggregators in federation_sizes:
            node, upload = node_case(x, n_aggregators)
            worst_node, worst_upload = min(worst_node, node), max(worst_upload, upload)
    return {"node": worst_node, "upload": worst_upload}


def node_case(x: np.ndarray, n_aggregators: int) -> tuple[float, float]:
    """Print one node row; return its GB/s and its upload ratio."""
    fed = Federation(n_aggregators)
    ctx = ShareContext(FEDERATION, STUDY, ROUND, "node-0")
    ring = encode(x, PARAMS)
    repeats = 7
    copy = copy_baseline(x.nbytes)
    total = best_of(lambda: fed.sealed_shares(x, "node-0"), repeats)
    t_encode = best_of(lambda: encode(x, PARAMS), repeats)
    t_split = best_of(lambda: split(ring, n_aggregators, ctx, PARAMS), repeats)
    copied = best_of(lambda: fed.sealed_shares(x, "node-0", copy=True), repeats)
    signed = best_of(lambda: fed.envelopes(x, "node-0"), repeats)
    upload = sum(len(e) for e in fed.envelopes(x, "node-0")) / x.nbytes
    print(
        f"{x.size / 1e6:>6.0f}M {n_aggregators:>2} {gbps(x.nbytes, copy):>5.2f}GB/s "
        f"{gbps(x.nbytes, total):>5.2f}GB/s {total / copy:>5.1f}x  "
        f"encode {t_encode * 1e3:.1f}ms, split {t_split * 1e3:.1f}ms, "
        f"seal {(total - t_encode - t_split) * 1e3:.1f}ms | via to_bytes "
        f"{gbps(x.nbytes, copied):.2f}GB/s, signed envelopes "
        f"{gbps(x.nbytes, signed):.2f}GB/s | upload {upload:.4f}x fp32"
    )
    return gbps(x.nbytes, total), upload


def aggregator_side(cases: tuple[tuple[int, int], ...]) -> float:
    rng = np.random.default_rng(1)
    worst = float("inf")
    print("\n## aggregator: open + parse + expand + sum, S = 2, per aggregator")
    header = f"{'nodes':>5} {'params':>7} {'agg':>5} {'memcpy':>9} {'per share':>10}"
    print(f"{header} {'ratio':>6}  detail")
    for nodes, length in cases:
        fed = Federation(2)
        names = [f"node-{i:03d}" for i in range(nodes)]
        x = rng.uniform(-1, 1, length).astype(np.float32)
        envelopes = [fed.envelopes(x, node) for node in names]
        for index in range(2):
            worst = min(worst, aggregator_case(fed, index, names, [e[index] for e in envelopes]))
    return worst


def aggregator_case(fed: Federation, index: int, names: list[str], envelopes: list[bytes]) -> float:
    """Print one aggregator row; return its per-share GB/s."""
    aggregator = fed.aggregators[index]
    keys = {node: fed.node_key(node).public_key() for node in names}
    messages = [ShareEnvelope.from_bytes(_body(envelope)) for envelope in envelopes]
    length = messages[0].vector_length
    nbytes = 4 * length
    copy = copy_baseline(nbytes)

    def sum_shares() -> tuple[float, float, int]:
        acc = np.zeros(length, dtype=PARAMS.dtype)
        full_time = seed_time = 0.0
        fulls = 0
        for node, message in zip(names, messages, strict=True):
            start = time.perf_counter()
            box = open_sealed(message.sealed, fed.hpke[index], binding(node, aggregator, PARAMS))
            share = Share.from_bytes(box, index, PARAMS, length)
            accumulate(acc, share, ShareContext(FEDERATION, STUDY, ROUND, node), PARAMS)
            spent = time.perf_counter() - start
            if share.vector is not None:
                full_time, fulls = full_time + spent, fulls + 1
            else:
                seed_time += spent
        return full_time, seed_time, fulls

    def with_envelopes() -> None:
        acc = np.zeros(length, dtype=PARAMS.dtype)
        for node, envelope in zip(names, envelopes, strict=True):
            limit = len(envelope) + 1024
            message = open_envelope_as(envelope, ShareEnvelope, keys, limit).message
            box = open_sealed(message.sealed, fed.hpke[index], binding(node, aggregator, PARAMS))
            ctx = ShareContext(FEDERATION, STUDY, ROUND, node)
            accumulate(acc, Share.from_bytes(box, index, PARAMS, length), ctx, PARAMS)

    total = best_of(sum_shares, 3)
    full_time, seed_time, fulls = sum_shares()
    signed = best_of(with_envelopes, 2)
    nodes, seeds = len(names), len(names) - fulls
    per_share = gbps(nodes * nbytes, total)
    print(
        f"{nodes:>5} {length / 1e6:>6.0f}M {aggregator:>5} {gbps(nbytes, copy):>5.2f}GB/s "
        f"{per_share:>6.2f}GB/s {total / nodes / copy:>5.1f}x  "
        f"{fulls} full shares at {_rate(nbytes, full_time, fulls)}, "
        f"{seeds} seeds at {_rate(nbytes, seed_time, seeds)} | with envelope "
        f"verification {gbps(nodes * nbytes, signed):.2f}GB/s"
    )
    return per_share


def _body(envelope: bytes) -> bytes:
    """The message inside a signed envelope, for the core-only timing (no verification)."""
    signer_length = int.from_bytes(envelope[5:7], "big")
    start = 7 + signer_length + 8
    size = int.from_bytes(envelope[start - 8 : start], "big")
    return envelope[start : start + size]


def _rate(nbytes: int, seconds: float, count: int) -> str:
    return f"{gbps(count * nbytes, seconds):.2f}GB/s" if count else "n/a"


def main() -> int:
    started = time.perf_counter()
    print(
        f"secagg benchmark: {PARAMS.bits}-bit ring, frac_bits {PARAMS.frac_bits}, "
        f"python {sys.version.split()[0]}, numpy {np.__version__}"
    )
    node = node_side((2, 3), (1_000_000, 11_000_000))
    aggregator = aggregator_side(((10, 11_000_000), (100, 1_000_000)))
    print("\n## targets (worst case over all rows)")
    rows = [
        ("node >= 0.5 GB/s", node["node"] >= TARGET_NODE_GBPS, f"{node['node']:.2f} GB/s"),
        ("upload <= 1.1x fp32", node["upload"] <= TARGET_UPLOAD_RATIO, f"{node['upload']:.4f}x"),
        (
            "aggregator per share >= 0.5 GB/s",
            aggregator >= TARGET_AGGREGATOR_GBPS,
            f"{aggregator:.2f} GB/s",
        ),
    ]
    for name, met, value in rows:
        print(f"{name:<34} {value:>12}  {'MET' if met else 'MISSED'}")
    print(f"\n(total benchmark time {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
