"""Participant agreement and the honest-aggregator rule (DESIGN.md section 3, steps 5 and 6).

Pure functions: the daemon hands in what it received and what it persisted, and gets back a
set to act on or an exception whose `reason` it publishes. Reasons carry counts, never site
names, because an aborted round must not reveal who took part.

Why the rule matters: if an aggregator summed any set a leader asked for, a leader could ask
for two sums over sets that differ by one hospital and subtract them, in one round or by
re-opening the same base model with another expected set (issue #18, attack 2). So each
aggregator publishes at most one partial sum per base model (hence per round), and only for
a set it checked itself: at least k members (its own k, never below the study's, whatever
the leader announced), every one of whom it holds a share from. The "already published"
fact comes from the store, which writes it in the same transaction as the decision, before
the publish.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from aggregator.errors import AgreementFailed, PartialSumRefused


def intersect_received(
    received_sets: Mapping[str, Collection[str]],
    aggregator_ids: Collection[str],
    expected_nodes: Collection[str],
    min_participants: int,
) -> tuple[str, ...]:
    """The leader's step 5: the sorted intersection of every aggregator's ReceivedSet.

    `received_sets` maps aggregator id -> the node ids it holds shares from (the leader's
    own included). Ids outside the round's expected roster are ignored. Raises AgreementFailed
    when an aggregator's set is missing (the daemon waits for it, or aborts at its own
    deadline) or when fewer than `min_participants` nodes reached every aggregator.
    """
    if min_participants < 1:
        raise ValueError(f"min_participants is {min_participants}; k must be at least 1")
    missing = sorted(set(aggregator_ids) - set(received_sets))
    if missing:
        raise AgreementFailed(
            f"no ReceivedSet yet from aggregator(s) {', '.join(missing)}; "
            "wait for them or abort the round at the agreement deadline"
        )
    unknown = sorted(set(received_sets) - set(aggregator_ids))
    if unknown:
        raise AgreementFailed(
            f"ReceivedSet from {', '.join(unknown)}, which is not an aggregator of this round"
        )
    common = set(expected_nodes)
    for aggregator_id in aggregator_ids:
        common &= set(received_sets[aggregator_id])
    if len(common) < min_participants:
        raise AgreementFailed(
            f"{len(common)} node(s) reached every aggregator, fewer than the minimum "
            f"k={min_participants}; nothing is released this round"
        )
    return tuple(sorted(common))


def statement_mismatches(received_sets: Mapping[str, Mapping[str, bytes]]) -> tuple[str, ...]:
    """The sorted nodes that told the aggregators different things: held by every aggregator,
    but with a statement commitment (`ReceivedSet.statement_hashes`) that differs between
    them. The leader leaves them out of the intersection, like dropouts, so one member cannot
    make the aggregators' model cards differ and stall the round."""
    if not received_sets:
        return ()
    common = set.intersection(*(set(held) for held in received_sets.values()))
    return tuple(
        sorted(node for node in common if len({held[node] for held in received_sets.values()}) > 1)
    )


@dataclass(frozen=True)
class PublishedSum:
    """The persisted fact that this aggregator published its partial sum in `round`, on
    that round's base model."""

    round: int
    participant_set_hash: bytes


def check_partial_sum_request(
    *,
    round_number: int,
    requested: Collection[str],
    requested_hash: bytes,
    held: Collection[str],
    expected_nodes: Collection[str],
    min_participants: int,
    already_published: PublishedSum | None,
) -> tuple[str, ...]:
    """Step 6's gate: return the sorted set this aggregator may sum, or raise PartialSumRefused.

    `requested` and `requested_hash` come from the leader's verified ParticipantSet
    (`node_ids`, `digest()`); the hash is what the store records and the PartialSum carries.

    `already_published` is the store's fact for this round's base model
    (store.published_on_base), from this round or an earlier one.

    Guarantees, when it returns: no partial sum was published on this round's base model
    before, the set has at least `min_participants` distinct members, every member is on the
    round's roster, and this aggregator holds a share from every member. The caller must
    persist the decision (store.decide_partial_sum) before it publishes; a second call on the
    same base model, in any round and with any set, then raises.
    """
    if min_participants < 1:
        raise ValueError(f"min_participants is {min_participants}; k must be at least 1")
    members = set(requested)
    if already_published is not None:
        same = already_published.participant_set_hash == requested_hash
        where = (
            "in this round"
            if already_published.round == round_number
            else f"on this base model in round {already_published.round}"
        )
        raise PartialSumRefused(
            f"round {round_number}: a partial sum was already published {where} "
            f"({'for this same set' if same else 'for a different set'}); "
            "an honest aggregator publishes at most one per base model"
        )
    if len(members) != len(tuple(requested)):
        raise PartialSumRefused(
            f"round {round_number}: the participant set names a node more than once; "
            "the leader's set is malformed"
        )
    if len(members) < min_participants:
        raise PartialSumRefused(
            f"round {round_number}: the participant set has {len(members)} member(s), "
            f"fewer than k={min_participants}"
        )
    strangers = members - set(expected_nodes)
    if strangers:
        raise PartialSumRefused(
            f"round {round_number}: {len(strangers)} member(s) of the participant set are "
            "not on the round's roster"
        )
    not_held = members - set(held)
    if not_held:
        raise PartialSumRefused(
            f"round {round_number}: this aggregator holds no share from {len(not_held)} "
            "member(s) of the participant set, so it cannot vouch for the set"
        )
    return tuple(sorted(members))
