"""Terms of a RoundOpen that every honest party checks for itself, never trusting the leader
(issue #18; docs/architecture.md, section 2: any aggregator may lie, the leader included).

Both a node (before it trains, so before its privacy ledger is charged) and every aggregator
(before it adopts the round) run these checks over the same RoundOpen, each with k and the
sites from its own signed manifest or roster:

- `check_expected_set`: every expected node is a site of the federation, and there are at
  least k of them. A round whose list is shorter than k can never release (attack 3), and a
  list padded with unknown ids lets a leader announce a large round that only the victim can
  join;
- `check_round_encoding`: the clip norm and the loss cap are within the study's caps, and the
  ring is the one those caps require: its bound is exactly `required_bound(clip_norm,
  loss_cap)` (a smaller one cannot encode an honest update, so the node would spend epsilon
  for nothing; a larger one admits values beyond the caps), it holds a sum over every
  expected node without wrapping, and it keeps at least MIN_FRAC_BITS of precision; and
  the weight cap and the ring's precision can represent an update: the smallest weight
  keeps two bits and a node at the cap is not rounded away
  (`tessera.crypto.update_layout.check_representable`; a node then checks its own weight).

Pure: no clock, no disk. Each failure raises RoundTermsRefused(reason, detail); the detail
names numbers, never a site.
"""

from __future__ import annotations

from collections.abc import Collection

from tessera.crypto.update_layout import (
    MAX_LOSS_CAP,
    STATS_LENGTH,
    check_representable,
    required_bound,
)
from tessera.wire.messages import RoundOpen

MIN_FRAC_BITS = 8  # below this, an update's fixed-point rounding swamps a small delta

REASONS = (
    "expected-not-in-manifest",
    "expected-below-k",
    "clip-norm-above-study",
    "ring-outside-caps",
    "update-unrepresentable",
)


class RoundTermsRefused(ValueError):
    """A RoundOpen whose terms this party will not act on; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"round refused ({reason}): {detail}")
        self.reason = reason
        self.detail = detail


def check_expected_set(round_open: RoundOpen, *, k: int, sites: Collection[str]) -> None:
    """Return only if every expected node is one of `sites` and there are at least `k`."""
    expected = round_open.expected_nodes
    unknown = set(expected) - set(sites)
    if unknown:
        raise RoundTermsRefused(
            "expected-not-in-manifest",
            f"{len(unknown)} of the round's {len(expected)} expected node(s) are not sites of "
            "the federation",
        )
    if len(expected) < k:
        raise RoundTermsRefused(
            "expected-below-k",
            f"the round expects {len(expected)} node(s), fewer than k = {k}; it could never "
            "release",
        )


def check_round_encoding(round_open: RoundOpen, *, max_clip_norm: float) -> None:
    """Return only if the clip norm, the loss cap and the ring fit the study's caps (see the
    module docstring); `max_clip_norm` is the study's clip norm."""
    a = round_open
    if a.clip_norm > max_clip_norm:
        raise RoundTermsRefused(
            "clip-norm-above-study",
            f"round clip norm {a.clip_norm} exceeds the study's {max_clip_norm}",
        )
    if not a.loss_cap <= MAX_LOSS_CAP:
        raise RoundTermsRefused(
            "ring-outside-caps", f"round loss cap {a.loss_cap} exceeds the cap {MAX_LOSS_CAP}"
        )
    needed = required_bound(a.clip_norm, a.loss_cap)
    if a.ring.bound != needed:
        raise RoundTermsRefused(
            "ring-outside-caps",
            f"the ring's bound is {a.ring.bound:g}, but clip norm {a.clip_norm:g} and loss cap "
            f"{a.loss_cap:g} require exactly {needed:g}",
        )
    if a.ring.max_participants < len(a.expected_nodes):
        raise RoundTermsRefused(
            "ring-outside-caps",
            f"the ring holds sums of {a.ring.max_participants} node(s), the round expects "
            f"{len(a.expected_nodes)}",
        )
    if a.ring.frac_bits < MIN_FRAC_BITS:
        raise RoundTermsRefused(
            "ring-outside-caps",
            f"the ring keeps {a.ring.frac_bits} fraction bits, fewer than {MIN_FRAC_BITS}",
        )
    try:
        check_representable(
            weight_cap=a.weight_cap,
            frac_bits=a.ring.frac_bits,
            clip_norm=a.clip_norm,
            n_params=max(1, a.vector_length - STATS_LENGTH),
        )
    except ValueError as exc:
        raise RoundTermsRefused("update-unrepresentable", str(exc)) from None
