"""The round state machine: every (stage, event) pair, allowed or rejected."""

from __future__ import annotations

import itertools

import pytest

from aggregator.errors import TransitionRejected
from aggregator.rounds import (
    ALLOWED,
    EVENT_TYPES,
    Abort,
    CandidateBuilt,
    CollectionClosed,
    ModelReleased,
    PartialSumPublished,
    ParticipantsAgreed,
    RoundState,
    ShareAccepted,
    Stage,
    StartCollecting,
    transition,
)

SAMPLE_EVENTS = {
    StartCollecting: StartCollecting(),
    ShareAccepted: ShareAccepted("site-a"),
    CollectionClosed: CollectionClosed("deadline"),
    ParticipantsAgreed: ParticipantsAgreed(("site-b", "site-a", "site-c")),
    PartialSumPublished: PartialSumPublished(),
    CandidateBuilt: CandidateBuilt(),
    ModelReleased: ModelReleased("1.3.0"),
    Abort: Abort("fewer than k participants"),
}

# The expected table, written out independently of the module's own.
EXPECTED = {
    (Stage.OPEN, StartCollecting): Stage.COLLECTING,
    (Stage.COLLECTING, ShareAccepted): Stage.COLLECTING,
    (Stage.COLLECTING, CollectionClosed): Stage.AGREEING,
    (Stage.AGREEING, ParticipantsAgreed): Stage.SUMMING,
    (Stage.SUMMING, PartialSumPublished): Stage.COMBINING,
    (Stage.COMBINING, ModelReleased): Stage.RELEASED,
    (Stage.COMBINING, CandidateBuilt): Stage.AUDITING,
    (Stage.AUDITING, ModelReleased): Stage.RELEASED,
    (Stage.OPEN, Abort): Stage.ABORTED,
    (Stage.COLLECTING, Abort): Stage.ABORTED,
    (Stage.AGREEING, Abort): Stage.ABORTED,
    (Stage.SUMMING, Abort): Stage.ABORTED,
    (Stage.COMBINING, Abort): Stage.ABORTED,
    (Stage.AUDITING, Abort): Stage.ABORTED,
}


def test_every_event_type_has_a_sample() -> None:
    assert set(SAMPLE_EVENTS) == set(EVENT_TYPES)
    assert dict(ALLOWED) == EXPECTED


@pytest.mark.parametrize(
    ("stage", "event_type"),
    list(itertools.product(Stage, EVENT_TYPES)),
    ids=lambda value: getattr(value, "name", str(value)),
)
def test_all_pairs(stage: Stage, event_type: type) -> None:
    state = RoundState(round=7, stage=stage)
    event = SAMPLE_EVENTS[event_type]
    expected = EXPECTED.get((stage, event_type))
    if expected is None:
        with pytest.raises(TransitionRejected) as caught:
            transition(state, event)
        assert caught.value.stage == stage.name
        assert caught.value.event == event.name
        assert stage.name in str(caught.value) and event.name in str(caught.value)
    else:
        after = transition(state, event)
        assert after.stage is expected
        assert state.stage is stage  # the input is never changed


def test_terminal_stages_accept_nothing() -> None:
    for stage in (Stage.RELEASED, Stage.ABORTED):
        for event in SAMPLE_EVENTS.values():
            with pytest.raises(TransitionRejected, match="none"):
                transition(RoundState(1, stage), event)


def test_a_full_round_records_what_happened() -> None:
    state = RoundState(round=3)
    state = transition(state, StartCollecting())
    for node in ("a", "b", "c"):
        state = transition(state, ShareAccepted(node))
    state = transition(state, CollectionClosed("all-reported"))
    state = transition(state, ParticipantsAgreed(("c", "a", "b", "a")))
    state = transition(state, PartialSumPublished())
    state = transition(state, ModelReleased("0.4.0"))
    assert state == RoundState(
        round=3,
        stage=Stage.RELEASED,
        received=3,
        close_reason="all-reported",
        participants=("a", "b", "c"),
        model_version="0.4.0",
    )


def test_abort_keeps_its_reason() -> None:
    state = transition(RoundState(2, Stage.AGREEING), Abort("2 participants, k=3"))
    assert state.stage is Stage.ABORTED and state.abort_reason == "2 participants, k=3"


@pytest.mark.parametrize(
    ("stage", "event"),
    [
        (Stage.COLLECTING, CollectionClosed("bored")),
        (Stage.AGREEING, ParticipantsAgreed(())),
        (Stage.COMBINING, ModelReleased("")),
        (Stage.OPEN, Abort("  ")),
    ],
)
def test_malformed_events_are_refused(stage: Stage, event: object) -> None:
    with pytest.raises(ValueError):
        transition(RoundState(1, stage), event)  # type: ignore[arg-type]
