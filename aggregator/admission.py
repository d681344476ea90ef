"""Admitting a share: the checks every aggregator makes before a share reaches the sum.

The daemon first opens the signed envelope (`tessera.wire.envelopes.open_envelope` with the
roster's node keys: that checks the signature and that the signer is the node the message
names). Then, here, against the round this aggregator announced or accepted:
`check_share_envelope` (study, round, base model, encoding, recipient, roster, stage) and
`open_share` (HPKE under the binding of exactly this round, node and aggregator, then the
strict share parse). What comes out goes to ShareAccumulator.add.

`collection_close_reason` is the step-5 trigger: stop at the deadline, or as soon as every
expected node has reported. All pure; the clock is an argument.
"""

from __future__ import annotations

import hmac
from collections.abc import Collection

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from aggregator.errors import ShareRejected
from aggregator.rounds import Stage
from tessera.crypto.sealing import open_sealed
from tessera.crypto.sharing import Share
from tessera.errors import CodecError
from tessera.wire.envelopes import share_binding
from tessera.wire.messages import RoundOpen, ShareEnvelope


def aggregator_index(announcement: RoundOpen, aggregator_id: str) -> int:
    """This aggregator's index in the round (its position in RoundOpen.aggregator_ids)."""
    try:
        return announcement.aggregator_ids.index(aggregator_id)
    except ValueError:
        raise ShareRejected(
            f"round {announcement.round} names aggregators {announcement.aggregator_ids}, "
            f"not {aggregator_id!r}; this aggregator takes no part in it"
        ) from None


def check_share_envelope(
    envelope: ShareEnvelope, announcement: RoundOpen, aggregator_id: str, stage: Stage
) -> None:
    """Raise ShareRejected unless the envelope belongs to this round, at this aggregator,
    from a node on the round's roster, while the round is collecting.

    The reasons name the mismatching field (for the log), never a share's content.
    """
    r = announcement
    if (envelope.federation_id, envelope.study_id) != (r.federation_id, r.study_id):
        raise ShareRejected(
            f"share for {envelope.federation_id}/{envelope.study_id}, this round is "
            f"{r.federation_id}/{r.study_id}; dropped"
        )
    if envelope.round != r.round:
        raise ShareRejected(f"share for round {envelope.round} while round {r.round} runs")
    if stage is not Stage.COLLECTING:
        raise ShareRejected(
            f"share from {envelope.node_id!r} for round {r.round} arrived in stage "
            f"{stage.name}; only a COLLECTING round takes shares (late or early: dropped)"
        )
    if envelope.aggregator_id != aggregator_id:
        raise ShareRejected(
            f"share addressed to {envelope.aggregator_id!r} reached {aggregator_id!r}; "
            "check the broker ACL and topic routing"
        )
    if envelope.node_id not in r.expected_nodes:
        raise ShareRejected(f"node {envelope.node_id!r} is not on round {r.round}'s roster")
    if not hmac.compare_digest(envelope.base_model_hash, r.base_model_hash):
        raise ShareRejected(
            f"share from {envelope.node_id!r} was trained on another base model "
            f"({envelope.base_model_hash.hex()[:16]}..., round uses "
            f"{r.base_model_hash.hex()[:16]}...); the node must fetch the current release"
        )
    if envelope.ring != r.ring or envelope.vector_length != r.vector_length:
        raise ShareRejected(
            f"share from {envelope.node_id!r} uses ring {envelope.ring} and length "
            f"{envelope.vector_length}; the round announced {r.ring} and {r.vector_length}"
        )


def open_share(
    envelope: ShareEnvelope,
    announcement: RoundOpen,
    aggregator_id: str,
    private_key: X25519PrivateKey,
) -> Share:
    """Open a checked envelope's sealed share. AuthenticationError (vague, on purpose) if
    the seal does not open under this round's binding; ShareRejected if the plaintext is
    not a share of the announced length and ring."""
    binding = share_binding(announcement, envelope.node_id, envelope.aggregator_id)
    plaintext = open_sealed(envelope.sealed, private_key, binding)
    try:
        return Share.from_bytes(
            plaintext,
            aggregator_index(announcement, aggregator_id),
            announcement.ring,
            announcement.vector_length,
        )
    except CodecError as exc:
        raise ShareRejected(f"share from {envelope.node_id!r} is malformed: {exc}") from None


def collection_close_reason(
    now_ms: int | None, deadline_ms: int, held: Collection[str], expected: Collection[str]
) -> str | None:
    """ "all-reported" once every expected node is held, "deadline" once it has passed,
    else None (keep collecting). All-reported wins when both hold. `now_ms` None (on a
    share, not on the clock) asks only whether everyone reported."""
    if set(expected) <= set(held):
        return "all-reported"
    if now_ms is not None and now_ms >= deadline_ms:
        return "deadline"
    return None
