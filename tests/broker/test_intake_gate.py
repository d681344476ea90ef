"""The intake gate: one token bucket per member, so a flood costs only the flooder's own
messages (issue 19, point 8)."""

from __future__ import annotations

import pytest

from broker import topics
from broker.intake import SPARE_MESSAGES, IntakeBudget, IntakeGate

SHARE_C = topics.share_topic("f", "s", "agg-1", "site-c")
SHARE_A = topics.share_topic("f", "s", "agg-1", "site-a")


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def gate(burst: int = 3, per_second: float = 1.0) -> tuple[IntakeGate, Clock]:
    clock = Clock()
    return IntakeGate(IntakeBudget(burst, per_second), topics.member_writer, clock), clock


def test_a_flooder_is_cut_off_at_its_budget_and_no_one_else_is() -> None:
    intake, _ = gate(burst=3)
    assert [intake.admit(SHARE_C) for _ in range(10)] == [True] * 3 + [False] * 7
    assert intake.admit(SHARE_A)  # another member's bucket is untouched
    assert intake.drain() == {"site-c": 7}
    assert intake.drain() == {}  # counted once
    assert intake.dropped_total == 7


def test_the_budget_refills_over_time_up_to_the_burst() -> None:
    intake, clock = gate(burst=3, per_second=2.0)
    for _ in range(3):
        intake.admit(SHARE_C)
    assert not intake.admit(SHARE_C)
    clock.now += 1.0  # two messages' worth
    assert [intake.admit(SHARE_C) for _ in range(3)] == [True, True, False]
    clock.now += 1000.0
    assert sum(intake.admit(SHARE_C) for _ in range(10)) == 3


def test_what_the_aggregators_write_is_never_gated() -> None:
    intake, _ = gate(burst=1)
    for topic in (topics.round_topic("f", "s"), topics.received_topic("f", "s", "agg-2")):
        assert all(intake.admit(topic) for _ in range(50))
    assert intake.drain() == {}


def test_the_default_budget_holds_two_of_the_largest_payloads() -> None:
    budget = IntakeBudget.for_payloads(256 << 20, 1 << 20)
    assert budget.burst == 2 * 256 + SPARE_MESSAGES
    assert budget.per_second == pytest.approx(budget.burst / 60)
    with pytest.raises(ValueError, match="burst >= 1"):
        IntakeBudget(0, 1.0)
