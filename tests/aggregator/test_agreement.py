"""Participant agreement (intersection, k) and the honest-aggregator rule."""

from __future__ import annotations

import hashlib

import pytest

from aggregator.agreement import (
    PublishedSum,
    check_partial_sum_request,
    intersect_received,
    retry_set,
    statement_mismatches,
)
from aggregator.errors import AgreementFailed, PartialSumRefused

ROSTER = ("site-a", "site-b", "site-c", "site-d")
BIG = tuple(f"site-{c}" for c in "abcdefgh")  # a roster where a retry can add k=3 nodes


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


def check(requested: tuple[str, ...], held: tuple[str, ...], *published: PublishedSum):
    return check_partial_sum_request(
        round_number=5,
        requested=requested,
        requested_hash=set_hash(requested),
        held=held,
        expected_nodes=BIG,
        min_participants=3,
        already_published=published,
    )


def test_a_checked_set_is_returned_sorted() -> None:
    assert check(("site-c", "site-a", "site-b"), ROSTER) == ("site-a", "site-b", "site-c")


def test_a_second_partial_sum_is_refused_even_for_the_same_set() -> None:
    first = ("site-a", "site-b", "site-c")
    published = PublishedSum(round=5, participant_set_hash=set_hash(first), participants=first)
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


def fact(round_number: int, members: tuple[str, ...] | None) -> PublishedSum:
    return PublishedSum(round_number, set_hash(members or ()), members)


def test_a_retry_on_a_summed_base_model_keeps_every_node_and_adds_none_or_k() -> None:
    """Issue #18, attack 2: re-opening a summed base model to difference two aggregates."""
    abc, abcd = ROSTER[:3], ROSTER[:4]
    with pytest.raises(PartialSumRefused, match="drops 1 of them and adds 0"):
        check(abc, ROSTER, fact(4, abcd))  # a subset: site-d's update
    with pytest.raises(PartialSumRefused, match="drops 0 of them and adds 1"):
        check(abcd, ROSTER, fact(4, abc))  # a superset adding fewer than k=3
    with pytest.raises(PartialSumRefused, match="drops 1 of them and adds 1"):
        check(("site-a", "site-b", "site-d"), ROSTER, fact(4, abc))
    with pytest.raises(PartialSumRefused, match="did not record"):
        check(abc, ROSTER, fact(4, None))  # a migrated fact with no set: spent
    assert check(abc, ROSTER, fact(4, abc)) == abc  # the same set: only fresh noise differs
    assert check(BIG[:6], BIG, fact(4, abc)) == BIG[:6]  # adds k=3
    with pytest.raises(PartialSumRefused, match="round 4 summed"):  # every fact, not the first
        check(BIG[:7], BIG, fact(3, abc), fact(4, BIG[:6]))


def test_the_leader_agrees_on_the_set_the_retry_rule_allows() -> None:
    abc = ROSTER[:3]
    assert retry_set(abc, [], 3) == abc
    assert retry_set(ROSTER[:4], [fact(1, abc)], 3) == abc  # site-d left out, like a dropout
    assert retry_set(BIG[:6], [fact(1, abc)], 3) == BIG[:6]
    with pytest.raises(AgreementFailed, match="1 node"):
        retry_set(BIG[:2] + BIG[3:7], [fact(1, abc)], 3)


def test_nodes_whose_statement_commitments_differ_are_named() -> None:
    a, b = b"a" * 32, b"b" * 32
    received = {
        "agg-1": {"site-a": a, "site-b": a, "site-c": a},
        "agg-2": {"site-a": b, "site-b": a, "site-d": b},  # site-a split, c and d dropped
    }
    assert statement_mismatches(received) == ("site-a",)
    assert statement_mismatches({"agg-1": {"site-a": a}, "agg-2": {"site-a": a}}) == ()
    assert statement_mismatches({}) == ()
