"""Participant agreement and the honest-aggregator rule (docs/architecture.md, 3.5-3.6).

Pure functions: the daemon hands in what it received and what it persisted, and gets back a
set to act on or an exception whose `reason` it publishes. Reasons carry counts, never site
names, because an aborted round must not reveal who took part.

Why the rule matters: if an aggregator summed any set a leader asked for, a leader could ask
for two sums over sets that differ by one hospital and subtract them, in one round or by
re-opening the same base model with another expected set (issue #18, attack 2). So each
aggregator publishes at most one partial sum per round, only for a set it checked itself (at
least k members, its own k never below the study's, whatever the leader announced, every one
of whom it holds a share from), and on a base model it already summed only under the retry
rule (`check_retry_rule`): the new set contains every set summed on that base before, and
equals it or adds at least k nodes. The "already published" facts come from the store, which
writes each in the same transaction as the decision, before the publish.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
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
    that round's base model, over `participants` (None: a store migrated from a schema that
    did not record the set; such a base model is never summed again)."""

    round: int
    participant_set_hash: bytes
    participants: tuple[str, ...] | None = None


def check_retry_rule(
    round_number: int, members: Collection[str], prior: Sequence[PublishedSum], k: int
) -> None:
    """The retry rule on a base model already summed (issue #18, attack 2): a set P may be
    summed only if, for every set P' summed on the same base before, P contains P' and
    either P == P' or P adds at least k nodes to P'. PartialSumRefused otherwise.

    Why it is safe: nodes retrain every round with fresh DP noise, so the difference of two
    sums over the same set is only noise; a superset that adds at least k nodes reveals at
    most an aggregate of k or more new updates, which is what any round releases anyway.
    Anything else (a subset, a set that drops a node, or one that adds fewer than k) could
    isolate fewer than k updates, and is refused. Why it is needed: without a retry, a round
    that aborts after its partial sums would spend its base model for good.
    """
    mine = set(members)
    for fact in prior:
        if fact.participants is None:
            raise PartialSumRefused(
                f"round {round_number}: round {fact.round} summed this base model over a set "
                "the store did not record (a migrated store); no retry can be checked, so "
                "the base model is spent: an operator registers a new base model"
            )
        before = set(fact.participants)
        dropped, added = len(before - mine), len(mine - before)
        if dropped or 0 < added < k:
            raise PartialSumRefused(
                f"round {round_number}: round {fact.round} summed this base model over "
                f"{len(before)} node(s); this set drops {dropped} of them and adds {added}. "
                f"A retry on a summed base model must keep every node it summed and add none "
                f"or at least k={k} (else two sums could be differenced); the leader must "
                "ask for such a set"
            )


def retry_set(common: Sequence[str], prior: Sequence[PublishedSum], k: int) -> tuple[str, ...]:
    """The leader's step 5 on a base model already summed: the agreed set the retry rule
    allows from `common` (the sorted intersection): `common` itself if it passes, else the
    largest set summed before when `common` contains it (the extra nodes are left out, like
    dropouts, so a node that missed the first try cannot block every retry). AgreementFailed
    when a node of an earlier sum did not reach every aggregator."""
    held = set(common)
    known = [fact.participants for fact in prior if fact.participants is not None]
    tries = [tuple(common), *sorted((p for p in known if set(p) <= held), key=len, reverse=True)]
    for candidate in tries:
        if len(candidate) < k:
            continue
        try:
            check_retry_rule(0, candidate, prior, k)
        except PartialSumRefused:
            continue
        return tuple(sorted(candidate))
    missing = len(set().union(*known) - held) if known else 0
    raise AgreementFailed(
        f"this base model was summed before without a release, and {missing} node(s) of "
        f"that sum did not reach every aggregator; a retry must keep every node it summed "
        f"and add none or at least k={k}, so nothing is released this round"
    )


def check_partial_sum_request(
    *,
    round_number: int,
    requested: Collection[str],
    requested_hash: bytes,
    held: Collection[str],
    expected_nodes: Collection[str],
    min_participants: int,
    already_published: Sequence[PublishedSum],
) -> tuple[str, ...]:
    """Step 6's gate: return the sorted set this aggregator may sum, or raise PartialSumRefused.

    `requested` and `requested_hash` come from the leader's verified ParticipantSet
    (`node_ids`, `digest()`); the hash is what the store records and the PartialSum carries.

    `already_published` is every fact of the store on this round's base model
    (store.published_on_base), from this round or earlier ones.

    Guarantees, when it returns: no partial sum was published in this round before, the set
    passes the retry rule against every earlier sum on this base model (`check_retry_rule`),
    it has at least `min_participants` distinct members, every member is on the round's
    roster, and this aggregator holds a share from every member. The caller must persist
    the decision (store.decide_partial_sum) before it publishes; a second call in the same
    round, or one breaking the retry rule, then raises.
    """
    if min_participants < 1:
        raise ValueError(f"min_participants is {min_participants}; k must be at least 1")
    members = set(requested)
    for fact in already_published:
        if fact.round == round_number:
            same = fact.participant_set_hash == requested_hash
            raise PartialSumRefused(
                f"round {round_number}: a partial sum was already published in this round "
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
    check_retry_rule(round_number, members, already_published, min_participants)
    not_held = members - set(held)
    if not_held:
        raise PartialSumRefused(
            f"round {round_number}: this aggregator holds no share from {len(not_held)} "
            "member(s) of the participant set, so it cannot vouch for the set"
        )
    return tuple(sorted(members))
