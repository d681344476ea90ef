"""The node's estimate of its clock against the leader's (node.round.clock; issue 19, point 7).

The clocks here are plain variables: each sample is the node's wall clock minus the
leader's signed `opened_ms`, so it is the skew plus the transit time."""

from __future__ import annotations

from pathlib import Path

from node.round.clock import KEEP, ClockReading, LeaderClock

LEADER_MS = 1_800_000_000_000


class Clocks:
    """A wall clock and a monotonic clock the test moves by hand."""

    def __init__(self, skew_s: float) -> None:
        self.real = LEADER_MS / 1000
        self.skew_s = skew_s
        self.monotonic = 1_000.0

    def wall(self) -> float:
        return self.real + self.skew_s

    def mono(self) -> float:
        return self.monotonic

    def advance(self, seconds: float) -> None:
        self.real += seconds
        self.monotonic += seconds


def leader_clock(clocks: Clocks, state: Path | None, tolerated_s: float = 900) -> LeaderClock:
    return LeaderClock(state, tolerated_s, wall=clocks.wall, monotonic=clocks.mono)


def test_the_estimate_is_the_smallest_recent_sample_and_survives_a_restart(
    tmp_path: Path,
) -> None:
    clocks = Clocks(skew_s=600)
    clock = leader_clock(clocks, tmp_path)
    assert clock.reading() == ClockReading(None, 900, 0)  # nothing measured yet
    for transit_s in (2.0, 0.25, 40.0):  # the last one waited at the broker
        sent_ms = int(clocks.real * 1000)
        clocks.advance(transit_s)
        reading = clock.observe(sent_ms)
        clocks.advance(60)
    assert reading.offset_s == 600.25 and reading.samples == 3
    assert reading.correction_s == 600.25 and not reading.beyond
    assert reading.describe() == "your clock is 600 s ahead of the leader's"

    # A restarted node keeps its samples, so a RoundOpen that waited does not count alone.
    restarted = leader_clock(clocks, tmp_path)
    assert restarted.reading().offset_s == 600.25
    for _ in range(KEEP):
        sent_ms = int(clocks.real * 1000)
        clocks.advance(5.0)
        restarted.observe(sent_ms)
    assert restarted.reading().offset_s == 605.0  # older samples age out of the window


def test_a_stepped_clock_forgets_the_samples_taken_before_the_step() -> None:
    clocks = Clocks(skew_s=-1200)  # 20 minutes behind
    clock = leader_clock(clocks, None)
    reading = clock.observe(int(clocks.real * 1000))
    assert reading.beyond and reading.correction_s == 0.0
    assert reading.describe() == "your clock is 1200 s behind the leader's"
    assert "more than the 900 s this node tolerates" in reading.refusal()
    assert "NTP" in reading.refusal()

    clocks.skew_s = 0.0  # NTP stepped the clock: wall minus monotonic moved by 1200 s
    assert clock.reading() == ClockReading(None, 900, 0)
    clocks.advance(1)
    reading = clock.observe(int((clocks.real - 0.5) * 1000))
    assert reading.offset_s == 0.5 and not reading.beyond
