"""Step 7 and 8 as pure helpers for the service: strategy, card, release (from the aggregate
that `aggregator.partials.combine_round` decoded and checked), and the release signature
exchange.

Signature exchange (the simplest scheme the existing ModelRelease type allows):

1. Every aggregator builds the same release from its own decoded aggregate (identical bytes
   by construction) and signs its header with `sign_release`.
2. A follower publishes a *signature note*: its release with the payload emptied and only
   its own signature, NOT retained, on the release topic. The signature covers the header,
   which includes the real payload's length, so emptying the payload does not change what
   was signed; a note can never pass `verify_release` (no payload, one signature), so a node
   that sees one refuses it.
3. The leader checks each note against its own release (same header, and the signature
   verifies over its own header bytes), adds the signature, and once all S are there
   registers the release and publishes it, fully signed and retained.
4. A follower registers the final release only if its model hash equals the one it
   computed itself and its own signature is in it (`Registry.register` verifies all S).

Where the study requires a privacy audit, the release first built is the *candidate*: the
leader publishes it with its signature only, the sites audit it, and once the gate passes
`with_audit_figures` re-cards it (same weights, same ONNX export, the figures added) and
re-signs; the exchange above then runs on that release.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from aggregator.config import AggregatorConfig
from aggregator.errors import AggregatorError
from aggregator.model_card import ModelCard
from aggregator.registry import assemble_release
from aggregator.strategies import ServerState, aggregate_from_vector
from aggregator.update import RoundOutcome, apply_round
from tessera.crypto.flatten import flatten
from tessera.crypto.signing import SignatureDomain, verify_message
from tessera.errors import AuthenticationError
from tessera.wire.messages import RoundOpen
from tessera.wire.release import ModelRelease, release_header_bytes, sign_release


@dataclass(frozen=True)
class BuiltRelease:
    """This aggregator's signed release of a round, and what the registry keeps with it."""

    release: ModelRelease  # payload and this aggregator's signature
    outcome: RoundOutcome
    card: ModelCard
    onnx: bytes


def build_signed_release(
    *,
    config: AggregatorConfig,
    announcement: RoundOpen,
    decoded: np.ndarray,
    participants: int,
    base_params: Mapping[str, np.ndarray],
    server_state: ServerState,
    version: int,
    parent_hash: bytes,
    onnx: Callable[[Mapping[str, np.ndarray], int], bytes],
    key: Ed25519PrivateKey,
    epsilon_per_site: Mapping[str, float],
) -> BuiltRelease:
    """Apply the strategy to the decoded aggregate, card and assemble the release, sign it.

    `decoded` is the round's aggregate as `aggregator.partials.combine_round` returns it:
    decoded and checked (`aggregator.aggregate_check`), so nothing here applies a sum that
    honest nodes could not have sent.

    `onnx(params, version)` exports the new weights (the caller's exporter). Everything else is
    deterministic, so every aggregator gets the same release bytes. `epsilon_per_site` is
    each site's composed epsilon, as its signed share envelopes state it (`carry_epsilon`).
    """
    aggregate = aggregate_from_vector(decoded, n=participants)
    outcome = apply_round(
        base_params,
        aggregate,
        server_state,
        config.strategy,
        announcement.algorithm,
        announcement.round,
    )
    _, manifest = flatten(outcome.params)
    card = ModelCard(
        federation_id=announcement.federation_id,
        study_id=announcement.study_id,
        version=version,
        round=announcement.round,
        parent_hash=parent_hash,
        participant_count=outcome.participants,
        min_participants=announcement.min_participants,
        algorithm=outcome.algorithm,
        optimizer=config.strategy.optimizer,
        adaptive=config.strategy.adaptive,
        switches=() if outcome.switch is None else (outcome.switch.to_dict(),),
        epsilon_per_site=dict(epsilon_per_site),
        validation={"mean_loss": outcome.mean_loss, "dispersion": outcome.dispersion},
        architecture=config.architecture or "",
        layout_digest=manifest.digest(),
    )
    exported = onnx(outcome.params, version)
    release = assemble_release(card=card, params=outcome.params, onnx=exported)
    return BuiltRelease(sign_release(release, config.aggregator_id, key), outcome, card, exported)


def with_audit_figures(
    candidate: BuiltRelease,
    figures: Mapping[str, Mapping[str, float]],
    aggregator_id: str,
    key: Ed25519PrivateKey,
) -> BuiltRelease:
    """The release of an audited candidate: the same weights and ONNX export, the card with
    the sites' audit figures (`aggregator.privacy_gate.card_figures`), signed afresh."""
    card = replace(candidate.card, privacy_audit=figures)
    release = assemble_release(card=card, params=candidate.outcome.params, onnx=candidate.onnx)
    return BuiltRelease(sign_release(release, aggregator_id, key), candidate.outcome, card,
                        candidate.onnx)  # fmt: skip


def carry_epsilon(
    parent_card: Mapping[str, Any] | None, this_round: Mapping[str, float]
) -> dict[str, float]:
    """Epsilon per site for a new card: the parent card's figures, updated with this
    round's participants' own (a site that sat this round out still shaped the model).
    A parent card that gave only a count and a maximum (fewer than k named) adds nothing."""
    carried: dict[str, float] = {}
    if parent_card is not None:
        named = parent_card.get("privacy", {}).get("epsilon_per_site", {})
        carried.update({site: float(epsilon) for site, epsilon in named.items()})
    carried.update({site: float(epsilon) for site, epsilon in this_round.items()})
    return dict(sorted(carried.items()))


def signature_note(release: ModelRelease, aggregator_id: str) -> ModelRelease:
    """A follower's note: its signed release with the payload emptied and only its signature."""
    mine = tuple(pair for pair in release.signatures if pair[0] == aggregator_id)
    if len(mine) != 1:
        raise AggregatorError(f"the release carries no signature by {aggregator_id!r}")
    return replace(release, payload=b"", signatures=mine)


def add_noted_signature(
    own: ModelRelease, note: ModelRelease, signer_key: Ed25519PublicKey
) -> ModelRelease:
    """The leader's step 3: `own` with the note's signature added, or AuthenticationError if
    the note is for another header or its signature does not verify over `own`'s header."""
    ((signer, signature),) = note.signatures
    same = (note.federation_id, note.study_id, note.round, note.version) == (
        own.federation_id,
        own.study_id,
        own.round,
        own.version,
    ) and all(
        hmac.compare_digest(getattr(note, name), getattr(own, name))
        for name in ("parent_hash", "model_hash", "onnx_hash", "card_hash")
    )
    if not same:
        raise AuthenticationError("signature note is for another release")
    verify_message(signer_key, SignatureDomain.RELEASE, release_header_bytes(own), signature)
    if any(name == signer for name, _ in own.signatures):
        return own
    return replace(own, signatures=(*own.signatures, (signer, signature)))
