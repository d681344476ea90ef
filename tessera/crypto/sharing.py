"""Additive secret sharing of ring vectors among S >= 2 aggregators.

A node splits its encoded vector x (tessera.crypto.encoding) into S shares that sum to x modulo
2**b. S-1 shares are 32-byte seeds drawn from the operating system's CSPRNG (os.urandom);
each stands for the vector its keystream expands to. The remaining share, the only
full-length one, is x minus the expansions of all the seeds. Any S-1 shares together are
uniformly random and independent of x (up to the PRG's security), so no coalition of S-1
aggregators learns anything about one node's vector from its shares; only all S together
give x.

The PRG. A seed becomes an AES-256 key through HKDF-SHA256, whose info string binds the
federation, the study, the round, the node and the aggregator index, each length-prefixed
so that no two different contexts encode to the same bytes. The mask is the AES-256-CTR
keystream under that key (a fixed all-zero initial counter is safe because each key makes
exactly one keystream), read as little-endian ring elements. Telling such a keystream of
q blocks from random bytes is as hard as breaking AES, up to q**2 / 2**129 (PRP/PRF
switching): under 2**-76 for a gigabyte. The binding means a seed replayed into another
round, study, node or aggregator expands to an unrelated mask, and a seed mistakenly sent
to two aggregators would still give them unrelated masks. AES-CTR is used because OpenSSL
runs it at several GB/s with AES-NI; numpy's generators are never used for masks, because
their state can be recovered from their output.

Which aggregator gets the full share rotates with the round (`full_share_holder`), so the
upload work of receiving and summing full vectors is spread evenly across aggregators.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tessera.crypto.encoding import RingParams
from tessera.errors import CodecError

SEED_BYTES = 32
MAX_AGGREGATORS = 255
_SEED_TAG = 1
_VECTOR_TAG = 2
_MASK_DOMAIN = b"tessera/share-mask/v1"
_HOLDER_DOMAIN = b"tessera/full-share-holder/v1"
# Keystream is made in chunks that stay in the CPU cache and are added straight into the
# target, instead of materialising a second full-length vector.
_CHUNK_BYTES = 1 << 18


@dataclass(frozen=True)
class ShareContext:
    """Who shares what, when: the domain every mask is bound to."""

    federation_id: str
    study_id: str
    round: int
    node_id: str

    def __post_init__(self) -> None:
        for name in ("federation_id", "study_id", "node_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"ShareContext.{name} must be a non-empty string, got {value!r}")
        if not isinstance(self.round, int) or not 0 <= self.round < 2**64:
            raise ValueError(
                f"ShareContext.round must be an integer in 0..2**64-1, got {self.round!r}"
            )


@dataclass(frozen=True)
class Share:
    """One aggregator's share: a seed (S-1 aggregators) or the full-length vector (one)."""

    aggregator_index: int
    # Kept out of repr so that a logged or printed Share never leaks its secret.
    seed: bytes | None = field(repr=False)
    vector: np.ndarray | None = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.aggregator_index, int) or not (
            0 <= self.aggregator_index < MAX_AGGREGATORS
        ):
            raise ValueError(
                f"aggregator_index must be in 0..{MAX_AGGREGATORS - 1}, "
                f"got {self.aggregator_index!r}"
            )
        if (self.seed is None) == (self.vector is None):
            raise ValueError("a Share holds exactly one of seed and vector")
        if self.seed is not None and (
            not isinstance(self.seed, bytes) or len(self.seed) != SEED_BYTES
        ):
            raise ValueError(f"a share seed must be {SEED_BYTES} bytes")
        if self.vector is not None and (
            self.vector.ndim != 1 or self.vector.dtype not in (np.uint32, np.uint64)
        ):
            raise ValueError(
                "a share vector must be 1-D uint32 or uint64, got "
                f"{self.vector.ndim}-D {self.vector.dtype}"
            )

    def to_bytes(self) -> bytes:
        """The plaintext to seal: the seed or the little-endian vector, then one tag byte.

        The tag goes last so that the vector starts at offset 0, aligned, both in the buffer
        `split` fills and in the bytes `from_bytes` parses.
        """
        return bytes(self.plaintext())

    def plaintext(self) -> memoryview:
        """The same bytes as `to_bytes`, without copying a vector that `split` made.

        For sealing large vectors: copying tens of megabytes into a new bytes object costs
        as much as the encryption. The view aliases the share's vector; do not modify it.
        """
        if self.seed is not None:
            return memoryview(self.seed + bytes([_SEED_TAG]))
        assert self.vector is not None
        owner = self.vector.base
        if (
            isinstance(owner, np.ndarray)
            and owner.dtype == np.uint8
            and owner.shape == (self.vector.nbytes + 1,)
            and owner.ctypes.data == self.vector.ctypes.data
            and owner[-1] == _VECTOR_TAG
            and self.vector.dtype.byteorder in "<="
            and np.little_endian
            and self.vector.flags.c_contiguous
        ):
            return owner.data
        little = np.ascontiguousarray(self.vector, dtype=self.vector.dtype.newbyteorder("<"))
        return memoryview(b"".join((little.data.cast("B"), bytes([_VECTOR_TAG]))))

    @classmethod
    def from_bytes(
        cls, data: bytes, aggregator_index: int, params: RingParams, length: int
    ) -> Share:
        """Parse `to_bytes` output; CodecError unless it is exactly a seed or a length-long vector.

        A parsed vector is a read-only view of `data` (no copy on little-endian hosts).
        """
        if not data:
            raise CodecError("empty share plaintext; expected a seed or vector and a tag byte")
        tag = data[-1]
        if tag == _SEED_TAG:
            if len(data) != SEED_BYTES + 1:
                raise CodecError(f"seed share must be {SEED_BYTES + 1} bytes, got {len(data)}")
            return cls(aggregator_index, bytes(data[:SEED_BYTES]), None)
        if tag == _VECTOR_TAG:
            expected = length * params.dtype.itemsize + 1
            if len(data) != expected:
                raise CodecError(
                    f"vector share of {length} {params.bits}-bit elements must be "
                    f"{expected} bytes, got {len(data)}; the sender used another model "
                    "layout or ring"
                )
            wire = np.frombuffer(data, dtype=params.dtype.newbyteorder("<"), count=length)
            return cls(aggregator_index, None, wire.astype(params.dtype, copy=False))
        raise CodecError(f"unknown share tag {tag}; expected {_SEED_TAG} (seed) or {_VECTOR_TAG}")


def _new_vector_share_buffer(length: int, params: RingParams) -> np.ndarray:
    """A full-length ring vector that already sits in its sealing layout (vector, then tag)."""
    buffer = np.empty(length * params.dtype.itemsize + 1, dtype=np.uint8)
    buffer[-1] = _VECTOR_TAG
    vector: np.ndarray = buffer[:-1].view(params.dtype.newbyteorder("<"))
    return vector


def _length_prefixed(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def _context_bytes(ctx: ShareContext) -> bytes:
    """Injective encoding of the context: every variable-length field is length-prefixed."""
    return (
        _length_prefixed(ctx.federation_id.encode())
        + _length_prefixed(ctx.study_id.encode())
        + struct.pack(">Q", ctx.round)
        + _length_prefixed(ctx.node_id.encode())
    )


def _mask_key(seed: bytes, ctx: ShareContext, aggregator_index: int) -> bytes:
    info = (
        _length_prefixed(_MASK_DOMAIN) + _context_bytes(ctx) + struct.pack(">I", aggregator_index)
    )
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(seed)


def _keystream_chunks(
    seed: bytes, ctx: ShareContext, aggregator_index: int, nbytes: int
) -> Iterator[memoryview]:
    """AES-256-CTR keystream for this seed and context, in cache-sized chunks."""
    cipher = Cipher(algorithms.AES(_mask_key(seed, ctx, aggregator_index)), modes.CTR(bytes(16)))
    encryptor = cipher.encryptor()
    zeros = memoryview(bytes(min(nbytes, _CHUNK_BYTES)))
    # update_into needs room for a block beyond the input; CTR never uses it.
    out = bytearray(len(zeros) + 15)
    done = 0
    while done < nbytes:
        step = min(_CHUNK_BYTES, nbytes - done)
        encryptor.update_into(zeros[:step], out)
        yield memoryview(out)[:step]
        done += step


def _check_ring_vector(name: str, vector: np.ndarray, params: RingParams) -> None:
    if vector.ndim != 1 or vector.dtype != params.dtype:
        raise ValueError(
            f"{name} must be a 1-D {params.dtype} ring vector (as encode returns for these "
            f"parameters), got {vector.ndim}-D {vector.dtype}"
        )


def _apply_masks(
    out: np.ndarray,
    source: np.ndarray,
    shares: Sequence[Share],
    ctx: ShareContext,
    subtract: bool,
) -> None:
    """out = source +/- the expansions of the shares' seeds, modulo 2**bits.

    Works chunk by chunk, applying every share's keystream to a chunk while it is in the
    CPU cache, so the vector is swept once however many seeds there are. out may be source.
    """
    wire = out.dtype.newbyteorder("<")
    per_chunk = _CHUNK_BYTES // out.dtype.itemsize
    operation = np.subtract if subtract else np.add
    streams = []
    for share in shares:
        assert share.seed is not None
        streams.append(_keystream_chunks(share.seed, ctx, share.aggregator_index, out.nbytes))
    for start, chunks in zip(
        range(0, out.size, per_chunk), zip(*streams, strict=True), strict=True
    ):
        stop = start + per_chunk
        part, target = source[start:stop], out[start:stop]
        for chunk in chunks:
            operation(part, np.frombuffer(chunk, dtype=wire), out=target)
            part = target


def full_share_holder(ctx: ShareContext, n_aggregators: int) -> int:
    """The index of the aggregator that gets this node's full-length share this round.

    Deterministic, so node and aggregators agree without talking: a SHA-256 of the
    federation, study and node gives each node an offset, and the round advances it by one,
    so over any S consecutive rounds each aggregator carries each node's full share once.
    """
    _check_aggregator_count(n_aggregators)
    digest = hashlib.sha256(
        _length_prefixed(_HOLDER_DOMAIN)
        + _length_prefixed(ctx.federation_id.encode())
        + _length_prefixed(ctx.study_id.encode())
        + _length_prefixed(ctx.node_id.encode())
    ).digest()
    return (int.from_bytes(digest[:8], "big") + ctx.round) % n_aggregators


def _check_aggregator_count(n_aggregators: int) -> None:
    if not isinstance(n_aggregators, int) or not 2 <= n_aggregators <= MAX_AGGREGATORS:
        raise ValueError(
            f"secret sharing needs 2..{MAX_AGGREGATORS} aggregators, got {n_aggregators!r}; "
            "with one aggregator it would see every update in the clear"
        )


def split(
    x_ring: np.ndarray, n_aggregators: int, ctx: ShareContext, params: RingParams
) -> list[Share]:
    """Split an encoded vector into n_aggregators shares, ordered by aggregator index.

    Guarantees: the expansions of all shares sum to x_ring modulo 2**bits; any S-1 of them
    are uniformly random and independent of x_ring (seeds come from os.urandom and each is
    expanded under its own context-bound key). A caller must send each share only to its
    own aggregator, sealed, and never reuse a seed.
    """
    _check_aggregator_count(n_aggregators)
    _check_ring_vector("x_ring", x_ring, params)
    holder = full_share_holder(ctx, n_aggregators)
    full = _new_vector_share_buffer(x_ring.size, params)
    shares = [
        Share(index, None, full) if index == holder else Share(index, os.urandom(SEED_BYTES), None)
        for index in range(n_aggregators)
    ]
    seeded = [share for share in shares if share.seed is not None]
    _apply_masks(full, x_ring, seeded, ctx, subtract=True)
    return shares


def expand(share: Share, ctx: ShareContext, length: int, params: RingParams) -> np.ndarray:
    """The ring vector a share stands for: its seed's keystream, or its vector (checked).

    Deterministic: the same seed, context and aggregator index always give the same vector.
    """
    if share.seed is None:
        assert share.vector is not None
        _check_ring_vector("share vector", share.vector, params)
        if share.vector.size != length:
            raise ValueError(
                f"share vector has {share.vector.size} elements, expected {length}; "
                "the share belongs to a different model layout"
            )
        return share.vector
    vector = np.zeros(length, dtype=params.dtype)
    _apply_masks(vector, vector, [share], ctx, subtract=False)
    return vector


def accumulate(acc: np.ndarray, share: Share, ctx: ShareContext, params: RingParams) -> None:
    """acc += expand(share, ...) modulo 2**bits, in place, without materialising the mask.

    The aggregator's inner loop: this is what summing seeds costs, so it stays chunked.
    """
    _check_ring_vector("accumulator", acc, params)
    if share.seed is None:
        add_into(acc, expand(share, ctx, acc.size, params))
    else:
        _apply_masks(acc, acc, [share], ctx, subtract=False)


def add_into(acc: np.ndarray, vector: np.ndarray) -> None:
    """acc += vector modulo 2**bits, in place (numpy unsigned arithmetic wraps)."""
    if acc.dtype not in (np.uint32, np.uint64) or vector.dtype != acc.dtype:
        raise ValueError(
            f"add_into needs two ring vectors of the same unsigned dtype, got {acc.dtype} "
            f"and {vector.dtype}"
        )
    if acc.shape != vector.shape:
        raise ValueError(f"cannot add a ring vector of shape {vector.shape} into {acc.shape}")
    np.add(acc, vector, out=acc)


def combine(partials: Sequence[np.ndarray]) -> np.ndarray:
    """Sum the aggregators' partial sums modulo 2**bits into a new array: the ring total."""
    if not partials:
        raise ValueError("combine needs at least one partial sum, got none")
    total: np.ndarray[Any, Any] = np.array(partials[0], copy=True)
    if total.dtype not in (np.uint32, np.uint64):
        raise ValueError(f"partial sums must be uint32 or uint64 ring vectors, got {total.dtype}")
    for partial in partials[1:]:
        add_into(total, partial)
    return total
