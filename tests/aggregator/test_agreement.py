"""Participant agreement (intersection, k) and the honest-aggregator rule."""

from __future__ import annotations

import hashlib

import pytest

from aggregator.agreement import (
    PublishedSum,
    check_partial_sum_request,
    intersect_received,
    statement_mismatches,
)
from aggregator.errors import AgreementFailed, PartialSumRefused

ROSTER = ("site-a", "site-b", "site-c", "site-d")


def set_hash(nodes: tuple[str, ...]) -> bytes:
    return hashlib.sha256(",".join(sorted(nodes)).encode()).digest()


def test_leader_intersects_every_received_set() -> None:
    agreed = intersect_received(
        {"agg-1": ["site-d", "site-a", "site-b"], "agg-2": ["site-b", "site-a", "site-c"]},
        aggregator_ids=("agg-1", "agg-2"),
        expected_nodes=ROSTER,
        min_participants=2,
    )
    assert agreed == ("site-a", "site-b")


def test_nodes_outside_the_roster_never_enter_the_set() -> None:
    agreed = intersect_received(
        {"agg-1": ["site-a", "site-b", "mallory"], "agg-2": ["site-a", "site-b", "mallory"]},
        aggregator_ids=("agg-1", "agg-2"),
        expected_nodes=ROSTER,
        min_participants=2,
    )
    assert agreed == ("site-a", "site-b")


def test_below_k_aborts_with_a_reason_that_names_no_site() -> None:
    with pytest.raises(AgreementFailed) as caught:
        intersect_received(
            {"agg-1": ["site-a", "site-b"], "agg-2": ["site-b", "site-c"]},
            aggregator_ids=("agg-1", "agg-2"),
            expected_nodes=ROSTER,
            min_participants=2,
        )
    assert "1 node(s)" in caught.value.reason and "k=2" in caught.value.reason
    assert "site-" not in caught.value.reason


def test_exactly_k_is_enough() -> None:
    received = {"agg-1": ["site-a", "site-b"], "agg-2": ["site-a", "site-b"]}
    assert intersect_received(received, ("agg-1", "agg-2"), ROSTER, 2) == ("site-a", "site-b")
    with pytest.raises(AgreementFailed):
        intersect_received(received, ("agg-1", "agg-2"), ROSTER, 3)


def test_a_missing_or_foreign_received_set_is_refused() -> None:
    with pytest.raises(AgreementFailed, match="agg-2"):
        intersect_received({"agg-1": ROSTER}, ("agg-1", "agg-2"), ROSTER, 1)
    with pytest.raises(AgreementFailed, match="agg-9"):
        intersect_received(
            {"agg-1": ROSTER, "agg-2": ROSTER, "agg-9": ROSTER}, ("agg-1", "agg-2"), ROSTER, 1
        )


def check(requested: tuple[str, ...], held: tuple[str, ...], published: PublishedSum | None = None):
    return check_partial_sum_request(
        round_number=5,
        requested=requested,
        requested_hash=set_hash(requested),
        held=held,
        expected_nodes=ROSTER,
        min_participants=3,
        already_published=published,
    )


def test_a_checked_set_is_returned_sorted() -> None:
    assert check(("site-c", "site-a", "site-b"), ROSTER) == ("site-a", "site-b", "site-c")


def test_a_second_partial_sum_is_refused_even_for_the_same_set() -> None:
    first = ("site-a", "site-b", "site-c")
    published = PublishedSum(round=5, participant_set_hash=set_hash(first))
    with pytest.raises(PartialSumRefused, match="same set"):
        check(first, ROSTER, published)
    # The attack the rule exists for: a set that differs by one hospital.
    with pytest.raises(PartialSumRefused, match="different set"):
        check(("site-a", "site-b", "site-c", "site-d"), ROSTER, published)


def test_a_set_with_a_node_we_hold_no_share_from_is_refused() -> None:
    with pytest.raises(PartialSumRefused, match="holds no share from 1"):
        check(("site-a", "site-b", "site-d"), ("site-a", "site-b", "site-c"))


def test_a_set_below_k_or_off_the_roster_is_refused() -> None:
    with pytest.raises(PartialSumRefused, match="fewer than k=3"):
        check(("site-a", "site-b"), ROSTER)
    with pytest.raises(PartialSumRefused, match="roster"):
        check(("site-a", "site-b", "mallory"), (*ROSTER, "mallory"))
    with pytest.raises(PartialSumRefused, match="more than once"):
        check(("site-a", "site-b", "site-a"), ROSTER)


def test_a_fact_from_an_earlier_round_on_the_same_base_model_refuses() -> None:
    """Issue #18, attack 2: re-opening a summed base model to difference two aggregates."""
    with pytest.raises(PartialSumRefused, match="on this base model in round 4"):
        check(ROSTER[:3], ROSTER, PublishedSum(round=4, participant_set_hash=bytes(32)))


def test_nodes_whose_statement_commitments_differ_are_named() -> None:
    a, b = b"a" * 32, b"b" * 32
    received = {
        "agg-1": {"site-a": a, "site-b": a, "site-c": a},
        "agg-2": {"site-a": b, "site-b": a, "site-d": b},  # site-a split, c and d dropped
    }
    assert statement_mismatches(received) == ("site-a",)
    assert statement_mismatches({"agg-1": {"site-a": a}, "agg-2": {"site-a": a}}) == ()
    assert statement_mismatches({}) == ()
