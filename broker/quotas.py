"""Who may hold how much of a receiver's open transfers: pure, no I/O (issue 20, point 5).

A transfer is charged to its `Origin`: its sender (the member whose topic it came on, or the
topic itself where several aggregators write it) and the pool that sender draws from. Each
pool has its own ceilings, so members' transfers can never crowd out the aggregators' (the
leader's RoundOpen, a follower's ReceivedSet, partial sums, releases); each sender has its
own ceilings within the pool.

`make_room` decides, for a new transfer, which open ones to drop first:

1. a sender at its own ceiling loses its own least recently active transfer: a site that
   restarted mid-upload replaces its stalled transfer, and one that opens transfers it never
   finishes only ever displaces its own;
2. a pool at its ceiling loses the least recently active transfer of the sender holding the
   most in that pool, counting the newcomer with its new transfer: another sender's only if
   it holds more than that, else the newcomer's own; a newcomer holding nothing yet that
   would be the heaviest is refused. So the transfers of whoever holds least are the last
   to go, and no sender can push out one holding less than itself.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

from broker.errors import PayloadTooLargeError


@dataclass(frozen=True)
class Origin:
    """Whom a transfer is charged to: its sender, and the pool that sender draws from."""

    sender: str
    pool: str = "default"


@dataclass(frozen=True)
class Holding:
    """One open transfer as the quotas see it: who holds it, its declared size, when it
    last made progress."""

    ident: Hashable
    origin: Origin
    size: int
    last_progress: float


@dataclass(frozen=True)
class QuotaLimits:
    """Ceilings per pool and per sender, in open transfers and declared bytes."""

    pool_transfers: int
    pool_bytes: int
    sender_transfers: int
    sender_bytes: int


@dataclass(frozen=True)
class _Usage:
    transfers: int = 0
    size: int = 0

    def plus(self, size: int) -> _Usage:
        return _Usage(self.transfers + 1, self.size + size)


def make_room(
    holdings: Iterable[Holding], origin: Origin, size: int, limits: QuotaLimits
) -> list[Holding]:
    """The open transfers to drop, in order, so that a new one of `size` bytes from `origin`
    fits; raise PayloadTooLargeError when it cannot (see the module docstring)."""
    if size > limits.sender_bytes or size > limits.pool_bytes:
        raise PayloadTooLargeError(
            f"a transfer of {size} bytes from {origin.sender} is over the "
            f"{min(limits.sender_bytes, limits.pool_bytes)} bytes one sender may hold"
        )
    pool = [h for h in holdings if h.origin.pool == origin.pool]
    evict: list[Holding] = []

    def stalest(sender: str) -> Holding:
        return min((h for h in pool if h.origin.sender == sender), key=lambda h: h.last_progress)

    def usage(sender: str) -> _Usage:
        mine = [h for h in pool if h.origin.sender == sender]
        return _Usage(len(mine), sum(h.size for h in mine))

    def drop(holding: Holding) -> None:
        pool.remove(holding)
        evict.append(holding)

    while True:  # 1. the sender's own ceiling: its own stalest transfers go first
        own = usage(origin.sender)
        if own.transfers < limits.sender_transfers and own.size + size <= limits.sender_bytes:
            break
        drop(stalest(origin.sender))
    while True:  # 2. the pool's ceiling: from whoever holds the most, the newcomer included
        over_count = len(pool) >= limits.pool_transfers
        over_bytes = sum(h.size for h in pool) + size > limits.pool_bytes
        if not (over_count or over_bytes):
            return evict
        measure: Callable[[_Usage], int] = (
            (lambda u: u.transfers) if over_count else (lambda u: u.size)
        )
        mine = measure(usage(origin.sender).plus(size))
        others = {h.origin.sender for h in pool} - {origin.sender}
        heaviest = max(others, key=lambda s: measure(usage(s)), default=None)
        if heaviest is not None and measure(usage(heaviest)) > mine:
            drop(stalest(heaviest))
        elif usage(origin.sender).transfers:
            drop(stalest(origin.sender))
        else:
            what = "transfers" if over_count else "declared bytes"
            raise PayloadTooLargeError(
                f"the {origin.pool} pool's {what} are full and no sender holds more than "
                f"{origin.sender} would; transfer refused"
            )
