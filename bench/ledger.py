"""The privacy ledger's charge cost against the number of rounds already charged.

    .venv/bin/python bench/ledger.py [--rounds 10,100,1000]

Each round a node composes its whole history to decide whether the round fits the budget.
`compose_epsilon` merges equal (noise multiplier, sample rate) terms first; the baseline,
in the same process, hands Opacus' accountant the history unmerged, one term per round (what
the ledger did before commit ba65629). Both must give the same epsilon; the ratio is
unmerged time / merged time. RDP accountant, noise 0.5, sample rate 0.25, 8 steps a round.
"""

from __future__ import annotations

import argparse
import time
import warnings

from opacus.accountants import RDPAccountant

from node.privacy.ledger import compose_epsilon

TERM = (0.5, 0.25, 8)
DELTA = 1e-5


def best_of(repeats: int, run: object) -> tuple[float, float]:
    """(the fastest of `repeats` runs in seconds, the value it returned)."""
    assert callable(run)
    times, value = [], 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        value = run()
        times.append(time.perf_counter() - start)
    return min(times), value


def unmerged(history: list[tuple[float, float, int]]) -> float:
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=DELTA))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", default="10,100,1000")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Optimal order")
    print(f"{'rounds':>7} {'unmerged':>10} {'merged':>9} {'ratio':>7}  epsilon")
    for rounds in (int(r) for r in args.rounds.split(",")):
        history = [TERM] * rounds
        repeats = 3 if rounds <= 100 else 1
        slow, slow_eps = best_of(repeats, lambda h=history: unmerged(h))
        fast, fast_eps = best_of(repeats, lambda h=history: compose_epsilon(h, DELTA, "rdp"))
        assert abs(slow_eps - fast_eps) <= 1e-9 * slow_eps, (slow_eps, fast_eps)
        print(f"{rounds:>7} {slow * 1e3:>8.1f}ms {fast * 1e3:>7.1f}ms {slow / fast:>6.0f}x  "
              f"{fast_eps:.4g}")  # fmt: skip


if __name__ == "__main__":
    main()
