"""Participant agreement and the honest-aggregator rule (docs/architecture.md, 3.5-3.6).

Pure functions: the daemon hands in what it received and what it persisted, and gets back a
set to act on or an exception whose `reason` it publishes. Reasons carry counts, never site
names, because an aborted round must not reveal who took part.

Why the rule matters: if an aggregator summed any set a leader asked for, a leader could ask
for two sums over sets that differ by one hospital and subtract them. So each aggregator
publishes at most one partial sum per round, and only for a set it checked itself: at least
k members, every one of whom it holds a share from. The "already published" fact comes from
the store, which writes it in the same transaction as the decision, before the publish.
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


@dataclass(frozen=True)
class PublishedSum:
    """The persisted fact that this aggregator published its partial sum for a round."""

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

    Guarantees, when it returns: no partial sum was published for this round before, the set
    has at least `min_participants` distinct members, every member is on the round's roster,
    and this aggregator holds a share from every member. The caller must persist the
    decision (store.record_partial_sum) before it publishes; a second call for the same
    round, with any set, then raises.
    """
    if min_participants < 1:
        raise ValueError(f"min_participants is {min_participants}; k must be at least 1")
    members = set(requested)
    if already_published is not None:
        if already_published.round != round_number:
            raise ValueError(
                f"published fact is for round {already_published.round}, "
                f"not round {round_number}; pass the fact of this round or None"
            )
        same = already_published.participant_set_hash == requested_hash
        raise PartialSumRefused(
            f"round {round_number}: a partial sum was already published "
            f"({'for this same set' if same else 'for a different set'}); "
            "an honest aggregator publishes at most one per round"
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
