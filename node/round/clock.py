"""How far this node's clock is from the leader's, measured from the leader's signed RoundOpen.

Each RoundOpen carries the leader's clock when it signed it (`opened_ms`). On receipt the
node takes one sample: its own clock minus that time. The measure is one-way, so a sample
is the skew *plus* the message's transit (and any time it waited at the broker, queued for
a node that was away): it overstates how far ahead the node is, never understates it. The
estimate is therefore the smallest recent sample (`KEEP`). What it is good for: a deadline
the leader set on its own clock is judged on that clock (`leader_time`), so a node whose
clock is off by up to `tolerated_s` (`max_clock_skew_s`, default 15 min) still takes part;
beyond that its rounds are refused with the reason "clock-skew" and the fix, and /readyz
says so, until the clock is right again.

What it does not trust: a retained RoundOpen replayed on a new subscription (it is as old
as the round, so its sample measures age; the daemon does not pass it in), and samples
taken before this machine's clock was stepped or rebooted: each sample keeps the wall clock
minus the monotonic clock at the time, and only those within `STEP_S` of the present value
count (so a fixed clock shows at once). The samples are kept in `<state>/clock.json` so a
restarted node does not take a RoundOpen that waited at the broker for a skew.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tessera.files import atomic_write

CLOCK_FILE = "clock.json"
KEEP = 4  # samples kept: the smallest counts
STEP_S = 1.0  # a larger change of wall minus monotonic time is a step (or a reboot)
_FORMAT = 1


@dataclass(frozen=True)
class ClockReading:
    """What the node knows of its clock against the leader's, now."""

    offset_s: float | None  # this clock minus the leader's; None until measured
    tolerated_s: float
    samples: int = 0

    @property
    def beyond(self) -> bool:
        """True when the measured offset is larger than the node tolerates."""
        return self.offset_s is not None and abs(self.offset_s) > self.tolerated_s

    @property
    def correction_s(self) -> float:
        """What to subtract from this clock to read the leader's (0 when unknown or beyond
        the tolerance: a skew that large is refused, not corrected)."""
        return 0.0 if self.offset_s is None or self.beyond else self.offset_s

    def describe(self) -> str:
        """"your clock is N s ahead of (behind) the leader's"."""
        if self.offset_s is None:
            return "your clock has not been compared with the leader's yet"
        side = "ahead of" if self.offset_s >= 0 else "behind"
        return f"your clock is {abs(self.offset_s):.0f} s {side} the leader's"

    def refusal(self) -> str:
        """Why a round is refused for the clock, and the fix."""
        return (
            f"{self.describe()} (measured from its signed RoundOpen on receipt; one-way, so "
            f"transit time counts as skew), more than the {self.tolerated_s:.0f} s this node "
            "tolerates (max_clock_skew_s); synchronise this machine's clock with NTP (e.g. "
            "chrony or systemd-timesyncd), and it takes part again from the next round"
        )

    def as_info(self) -> dict[str, Any]:
        """For /readyz's `info`."""
        return {
            "offset_s": None if self.offset_s is None else round(self.offset_s, 3),
            "tolerated_s": self.tolerated_s,
            "samples": self.samples,
            "measured": "one-way, from the leader's signed RoundOpen: skew plus transit time",
        }


class LeaderClock:
    """The samples of this node's clock against the leader's (module docstring)."""

    def __init__(
        self,
        state_dir: Path | None,
        tolerated_s: float,
        *,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tolerated_s = tolerated_s
        self._path = None if state_dir is None else Path(state_dir) / CLOCK_FILE
        self._wall, self._monotonic = wall, monotonic
        self._lock = threading.Lock()
        self._samples: list[tuple[float, float]] = self._load()  # (offset_s, wall - mono)

    def now(self) -> float:
        """This node's wall clock (Unix seconds)."""
        return self._wall()

    def observe(self, leader_ms: int) -> ClockReading:
        """Take one sample from a leader's signed timestamp just received; the new reading."""
        wall = self._wall()
        sample = (wall - leader_ms / 1000, wall - self._monotonic())
        with self._lock:
            self._samples = [*self._valid(sample[1]), sample][-KEEP:]
            kept = list(self._samples)
        if self._path is not None:
            document = {"format": _FORMAT, "samples": [list(s) for s in kept]}
            try:  # a cache: a full disk or a lost file costs only the history
                atomic_write(self._path, json.dumps(document).encode(), durable=False)
            except OSError:
                pass
        return self.reading()

    def reading(self) -> ClockReading:
        """The estimate from the samples that still count."""
        with self._lock:
            valid = self._valid(self._wall() - self._monotonic())
        offset = min(s[0] for s in valid) if valid else None
        return ClockReading(offset, self.tolerated_s, len(valid))

    def _valid(self, boot: float) -> list[tuple[float, float]]:
        return [s for s in self._samples if abs(s[1] - boot) <= STEP_S]

    def _load(self) -> list[tuple[float, float]]:
        if self._path is None:
            return []
        try:
            document = json.loads(self._path.read_text(encoding="utf-8"))
            if document.get("format") != _FORMAT:
                return []
            return [(float(a), float(b)) for a, b in document["samples"]][-KEEP:]
        except (OSError, ValueError, KeyError, TypeError):
            return []  # no history (first start, or a damaged cache): measure afresh
