"""The round state machine: explicit stages, and one pure transition function.

A round moves OPEN -> COLLECTING -> AGREEING -> SUMMING -> COMBINING -> RELEASED (through
AUDITING, between COMBINING and RELEASED, when the study requires a privacy audit), and can
be ABORTED from any stage that is not over. `transition(state, event)` returns the next state or
raises `TransitionRejected` naming the stage and the event; it never mutates, reads the clock
or touches the disk. The daemon persists every state it gets back (aggregator.store) and
acts on it.

Stages, from one aggregator's point of view:

- OPEN: the round exists (announced by the leader, or received from it); nothing accepted yet.
- COLLECTING: shares are accepted until the deadline or until every expected node reported.
- AGREEING: collection is closed; waiting for the leader's ParticipantSet.
- SUMMING: the set is agreed and checked; this aggregator sums and publishes its one
  partial sum. The "published" fact is stored before the message leaves (store.py).
- COMBINING: own partial sum out; waiting for the others', then decode, strategy, export,
  sign.
- AUDITING: (studies that require a privacy audit) the candidate model is built and out to
  the participating sites; waiting for their signed audit reports, then the release gate
  (aggregator.privacy_gate), then, if it passes, the signatures. A hold aborts the round.
- RELEASED: the signed model is out. Terminal.
- ABORTED: the round ended without a model, with a reason. Terminal.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import ClassVar

from aggregator.errors import TransitionRejected

CLOSE_REASONS = ("deadline", "all-reported", "participant-set")


class Stage(enum.Enum):
    """Where a round stands. The value is what the store persists; the declaration order is
    the happy path, which the store uses to refuse rolling a round back."""

    OPEN = "open"
    COLLECTING = "collecting"
    AGREEING = "agreeing"
    SUMMING = "summing"
    COMBINING = "combining"
    AUDITING = "auditing"
    RELEASED = "released"
    ABORTED = "aborted"

    @property
    def is_terminal(self) -> bool:
        """True for RELEASED and ABORTED: no event is accepted any more."""
        return self in (Stage.RELEASED, Stage.ABORTED)


@dataclass(frozen=True)
class RoundState:
    """Everything the state machine decides on, for one round."""

    round: int
    stage: Stage = Stage.OPEN
    received: int = 0  # shares accepted so far (the node ids live in the store)
    close_reason: str | None = None
    participants: tuple[str, ...] | None = None  # sorted, once agreed
    model_version: str | None = None
    abort_reason: str | None = None


# Events. Each is a small frozen value; `name` is what errors and logs show.


@dataclass(frozen=True)
class StartCollecting:
    """The RoundOpen is out (leader) or verified (follower): start accepting shares."""

    name: ClassVar[str] = "start-collecting"


@dataclass(frozen=True)
class ShareAccepted:
    """One verified, non-duplicate share was accumulated."""

    node_id: str
    name: ClassVar[str] = "share-accepted"


@dataclass(frozen=True)
class CollectionClosed:
    """The deadline passed, or every expected node reported."""

    # "deadline", "all-reported", or "participant-set" (a follower got the leader's set
    # before its own clock reached the deadline)
    reason: str
    name: ClassVar[str] = "collection-closed"


@dataclass(frozen=True)
class ParticipantsAgreed:
    """The leader's ParticipantSet arrived and passed this aggregator's own checks."""

    node_ids: tuple[str, ...]
    name: ClassVar[str] = "participants-agreed"


@dataclass(frozen=True)
class PartialSumPublished:
    """This aggregator's one partial sum for the round is recorded and sent."""

    name: ClassVar[str] = "partial-sum-published"


@dataclass(frozen=True)
class CandidateBuilt:
    """The candidate model is built and sent to the sites for their privacy audits."""

    name: ClassVar[str] = "candidate-built"


@dataclass(frozen=True)
class ModelReleased:
    """The jointly signed release is published."""

    version: str
    name: ClassVar[str] = "model-released"


@dataclass(frozen=True)
class Abort:
    """End the round without a model, for `reason` (safe to publish: no site names)."""

    reason: str
    name: ClassVar[str] = "abort"


Event = (
    StartCollecting
    | ShareAccepted
    | CollectionClosed
    | ParticipantsAgreed
    | PartialSumPublished
    | CandidateBuilt
    | ModelReleased
    | Abort
)

EVENT_TYPES: tuple[type[Event], ...] = (
    StartCollecting,
    ShareAccepted,
    CollectionClosed,
    ParticipantsAgreed,
    PartialSumPublished,
    CandidateBuilt,
    ModelReleased,
    Abort,
)


def _build_moves() -> dict[tuple[Stage, type[Event]], Stage]:
    """The whole table of allowed moves, (stage, event type) -> next stage.

    Abort is allowed from every non-terminal stage; everything not listed is rejected.
    """
    moves: dict[tuple[Stage, type[Event]], Stage] = {
        (Stage.OPEN, StartCollecting): Stage.COLLECTING,
        (Stage.COLLECTING, ShareAccepted): Stage.COLLECTING,
        (Stage.COLLECTING, CollectionClosed): Stage.AGREEING,
        (Stage.AGREEING, ParticipantsAgreed): Stage.SUMMING,
        (Stage.SUMMING, PartialSumPublished): Stage.COMBINING,
        (Stage.COMBINING, ModelReleased): Stage.RELEASED,
        (Stage.COMBINING, CandidateBuilt): Stage.AUDITING,
        (Stage.AUDITING, ModelReleased): Stage.RELEASED,
    }
    for stage in Stage:
        if not stage.is_terminal:
            moves[(stage, Abort)] = Stage.ABORTED
    return moves


# Read-only view: the table is a constant of the protocol, not state.
ALLOWED: Mapping[tuple[Stage, type[Event]], Stage] = MappingProxyType(_build_moves())


def allowed_events(stage: Stage) -> tuple[str, ...]:
    """The names of the events `stage` accepts, in table order."""
    return tuple(event.name for (s, event) in ALLOWED if s is stage)


def transition(state: RoundState, event: Event) -> RoundState:
    """Return the state after `event`, or raise TransitionRejected if the stage forbids it.

    Pure: the input state is never changed. Besides the stage table it checks the event's
    own content (a close reason, a non-empty sorted-unique participant set, a reason for an
    abort) and rejects malformed events with ValueError.
    """
    target = ALLOWED.get((state.stage, type(event)))
    if target is None:
        raise TransitionRejected(
            state.round, state.stage.name, event.name, allowed_events(state.stage)
        )
    if isinstance(event, ShareAccepted):
        return replace(state, received=state.received + 1)
    if isinstance(event, CollectionClosed):
        if event.reason not in CLOSE_REASONS:
            raise ValueError(
                f"collection close reason {event.reason!r} is unknown; use one of {CLOSE_REASONS}"
            )
        return replace(state, stage=target, close_reason=event.reason)
    if isinstance(event, ParticipantsAgreed):
        if not event.node_ids:
            raise ValueError("an agreed participant set cannot be empty")
        return replace(state, stage=target, participants=tuple(sorted(set(event.node_ids))))
    if isinstance(event, ModelReleased):
        if not event.version:
            raise ValueError("a released model needs a version string")
        return replace(state, stage=target, model_version=event.version)
    if isinstance(event, Abort):
        if not event.reason.strip():
            raise ValueError("an abort needs a reason; say why the round ended")
        return replace(state, stage=target, abort_reason=event.reason)
    return replace(state, stage=target)
