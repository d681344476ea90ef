"""Regression: a follower's signature note that reaches the leader after the round aborted
(at the agreement timeout) must not register the model at the leader.

Found end to end (tests/e2e): the leader registered version 1 of an aborted round, the
follower never did, and every later RoundOpen named a base model the follower did not hold,
so the federation could not release again."""

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
