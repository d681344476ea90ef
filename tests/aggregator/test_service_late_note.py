"""Regressions found end to end (tests/e2e): what happens at the end of a round.

A follower's signature note that reaches the leader after the round aborted
(at the agreement timeout) must not register the model at the leader.

The leader used to register version 1 of an aborted round, the
follower never did, and every later RoundOpen named a base model the follower did not hold,
so the federation could not release again.

Shares (seed rows and full-share files) used to stay on disk after their round ended, until
the next restart; they are now deleted as soon as the round is released or aborted."""

from __future__ import annotations

from pathlib import Path

from aggregator.rounds import Stage
from broker import topics
from tests.aggregator.test_service import (
    LEADER,
    NODES,
    STUDY,
    Federation,
    Outgoing,
    kind_of,
    run_round,
)


def test_a_note_after_the_abort_registers_nothing_and_the_next_round_opens(
    tmp_path: Path,
) -> None:
    fed = Federation(tmp_path)

    def note(out: Outgoing) -> bool:
        return kind_of(out) is topics.Kind.RELEASE

    run_round(fed, skip=set(), drop=note)  # everyone reports; the note is held back
    (held,) = fed.lost
    assert fed.stage(LEADER) is Stage.COMBINING
    timeout = fed.services[LEADER].config.round.agreement_timeout_s
    fed.past_deadline(extra_s=timeout + 1)
    assert fed.stage(LEADER) is Stage.ABORTED and fed.stage("agg-2") is Stage.ABORTED

    fed.deliver([held])  # the late note
    assert fed.stage(LEADER) is Stage.ABORTED
    for service in fed.services.values():
        assert service.registry.latest(STUDY) is None

    fed.deliver(fed.services[LEADER].open_round(NODES))
    assert fed.stage(LEADER) is Stage.COLLECTING
    assert fed.stage("agg-2") is Stage.COLLECTING  # same base model at both


def shares_left(fed: Federation) -> dict[str, tuple[int, int]]:
    """Per aggregator: (share rows, share files) still in its store, any round."""
    left = {}
    for agg, service in fed.services.items():
        rows = service.store._db.execute("SELECT COUNT(*) FROM shares").fetchone()[0]
        files = len(list(service.store.shares_dir.rglob("*.share")))
        left[agg] = (rows, files)
    return left


def test_shares_are_deleted_when_a_round_is_released_or_aborted(tmp_path: Path) -> None:
    fed = Federation(tmp_path)
    run_round(fed, skip=set())
    assert all(fed.stage(a) is Stage.RELEASED for a in fed.services)
    assert shares_left(fed) == {a: (0, 0) for a in fed.services}

    run_round(fed, skip={("site-a", "agg-2"), ("site-b", "agg-2")})  # 2 < k = 3 in common
    assert shares_left(fed)[LEADER][0] == len(NODES)
    fed.past_deadline()
    assert all(fed.stage(a) is Stage.ABORTED for a in fed.services)
    assert shares_left(fed) == {a: (0, 0) for a in fed.services}
