"""Partial sums between aggregators (docs/architecture.md, section 3, steps 6 and 7).

`seal_partial_sums` seals this aggregator's one partial sum to each other aggregator, bound
to the round and to the participant set's hash. `open_partial_sum` opens one it received and
refuses it unless it covers exactly the set this aggregator agreed to: adding sums over two
different sets would decode to garbage, or worse, to one hospital's update
(`open_partial_sums` opens every one a round received). `combine_round` adds all S partial
sums, decodes the aggregate and checks it (aggregator.aggregate_check) before anything is
applied: a sum outside what honest nodes can give raises AggregateRefused, and the round
aborts with its reason.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from aggregator.aggregate_check import AggregateTerms, check_aggregate
from aggregator.errors import AggregateRefused, AggregatorError, PartialSumRejected
from tessera.crypto.encoding import decode
from tessera.crypto.sealing import open_sealed, seal
from tessera.crypto.sharing import combine
from tessera.errors import TesseraError
from tessera.wire.envelopes import partial_sum_binding
from tessera.wire.messages import PartialSum, RoundOpen


def seal_partial_sums(
    partial: np.ndarray,
    announcement: RoundOpen,
    aggregator_id: str,
    set_hash: bytes,
    recipients: Mapping[str, X25519PublicKey],
) -> list[PartialSum]:
    """One sealed PartialSum per other aggregator of the round (recipients: their HPKE keys).

    Call only after store.decide_partial_sum committed the decision for this round.
    """
    _check_vector(partial, announcement, "own partial sum")
    plaintext = np.ascontiguousarray(partial, dtype=partial.dtype.newbyteorder("<")).tobytes()
    messages = []
    for other in announcement.aggregator_ids:
        if other == aggregator_id:
            continue
        if other not in recipients:
            raise AggregatorError(
                f"no HPKE public key for aggregator {other!r}; take it from the federation manifest"
            )
        binding = partial_sum_binding(announcement, aggregator_id, other)
        sealed = seal(plaintext, recipients[other], binding)
        messages.append(
            PartialSum(
                announcement.federation_id,
                announcement.study_id,
                announcement.round,
                aggregator_id,
                other,
                set_hash,
                sealed,
            )
        )
    return messages


def open_partial_sum(
    message: PartialSum,
    announcement: RoundOpen,
    aggregator_id: str,
    private_key: X25519PrivateKey,
    agreed_set_hash: bytes,
) -> np.ndarray:
    """Open a partial sum sent to this aggregator; PartialSumRejected unless it is for this
    round, from one of its aggregators, and over exactly the agreed set. AuthenticationError
    (vague) if the seal does not open."""
    if (message.federation_id, message.study_id, message.round) != (
        announcement.federation_id,
        announcement.study_id,
        announcement.round,
    ):
        raise PartialSumRejected(
            f"partial sum for round {message.round} of {message.study_id} while round "
            f"{announcement.round} of {announcement.study_id} runs"
        )
    if message.to_aggregator != aggregator_id or message.from_aggregator not in (
        set(announcement.aggregator_ids) - {aggregator_id}
    ):
        raise PartialSumRejected(
            f"partial sum from {message.from_aggregator!r} to {message.to_aggregator!r} is not "
            f"one this aggregator ({aggregator_id!r}) expects in this round"
        )
    if not hmac.compare_digest(message.participant_set_hash, agreed_set_hash):
        raise PartialSumRejected(
            f"partial sum from {message.from_aggregator!r} covers another participant set; "
            "abort the round (the aggregators disagree on who took part)"
        )
    binding = partial_sum_binding(announcement, message.from_aggregator, aggregator_id)
    plaintext = open_sealed(message.sealed, private_key, binding)
    dtype = announcement.ring.dtype
    if len(plaintext) != announcement.vector_length * dtype.itemsize:
        raise PartialSumRejected(
            f"partial sum from {message.from_aggregator!r} is {len(plaintext)} bytes, expected "
            f"{announcement.vector_length * dtype.itemsize}"
        )
    vector = np.frombuffer(plaintext, dtype=dtype.newbyteorder("<"))
    result: np.ndarray = vector.astype(dtype)
    return result


def open_partial_sums(
    own: np.ndarray,
    received: Mapping[str, PartialSum],
    announcement: RoundOpen,
    aggregator_id: str,
    private_key: X25519PrivateKey,
    agreed_set_hash: bytes,
) -> dict[str, np.ndarray]:
    """Every aggregator's partial sum: `own`, and each of `received` opened with
    `open_partial_sum`. PartialSumRejected naming the first (by id) that does not open, and
    why in one word: the round must abort."""
    vectors = {aggregator_id: own}
    for other in sorted(received):
        try:
            vectors[other] = open_partial_sum(
                received[other], announcement, aggregator_id, private_key, agreed_set_hash
            )
        except (TesseraError, ValueError) as exc:
            raise PartialSumRejected(
                f"partial sum from {other} refused: {type(exc).__name__}"
            ) from exc
    return vectors


def combine_round(
    partials: Mapping[str, np.ndarray], announcement: RoundOpen, n_participants: int
) -> np.ndarray:
    """Add every aggregator's partial sum, decode the aggregate (float64) and check it.

    AggregateRefused (the round must abort; its reason names the part and the figure) when
    the ring sum is outside the range n_participants encodings can reach, or the decoded
    sum is outside what n honest nodes can give under the round's terms
    (`aggregator.aggregate_check.check_aggregate`). The sum is taken in aggregator-index
    order, although modular addition does not care, so that the code path is the same at
    every aggregator.
    """
    missing = [a for a in announcement.aggregator_ids if a not in partials]
    if missing:
        raise PartialSumRejected(f"no partial sum yet from {', '.join(missing)}")
    ordered = [partials[a] for a in announcement.aggregator_ids]
    for vector in ordered:
        _check_vector(vector, announcement, "partial sum")
    total = combine(ordered)
    try:
        decoded: np.ndarray = decode(total, announcement.ring, n_participants)
    except ValueError:  # a node sent ring values beyond the bound: abort, never stall
        limit = n_participants * announcement.ring.bound
        raise AggregateRefused(
            "range",
            limit,
            f"the ring sum is outside the range {n_participants} encodings can reach "
            f"(|x| <= {limit:g}): a node sent values beyond the ring's bound",
        ) from None
    check_aggregate(decoded, n_participants, AggregateTerms.of(announcement))
    return decoded


def _check_vector(vector: np.ndarray, announcement: RoundOpen, what: str) -> None:
    if vector.shape != (announcement.vector_length,) or vector.dtype != announcement.ring.dtype:
        raise PartialSumRejected(
            f"{what} is {vector.dtype}{list(vector.shape)}, the round's vectors are "
            f"{announcement.ring.dtype}[{announcement.vector_length}]"
        )
