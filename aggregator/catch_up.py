"""Catch-up: the one thing of a round that survives an aggregator's restart.

A round is not resumed after a restart: the daemon runs `store.recover()` first (it aborts
the rounds in flight and deletes their shares), and the service starts with no round until
the next RoundOpen. But a follower killed after sending its signature note has helped
compute a release that the leader may publish while it is down. The broker retains that
release and delivers it again on reconnect; `catch_up` registers it. Without this, every
later RoundOpen names a base model the follower does not hold, and the federation stops.
"""

from __future__ import annotations

import logging

from aggregator.config import AggregatorConfig
from aggregator.errors import MessageRejected
from aggregator.model_card import card_from_bytes
from aggregator.registry import GENESIS_PARENT, Registry
from aggregator.round_context import latest_server_state
from aggregator.signed_messages import RosterKeys
from aggregator.store import Store
from tessera.observability.events import Event
from tessera.wire.messages import ModelRelease
from tessera.wire.release import verify_release

# One logger for all of the service's events, wherever the step lives.
log = logging.getLogger("tessera.aggregator.service")


def catch_up(
    release: ModelRelease,
    config: AggregatorConfig,
    roster: RosterKeys,
    registry: Registry,
    store: Store,
) -> None:
    """Register a release of a round this aggregator no longer holds in memory: it signed
    the release, then restarted before the leader's copy arrived.

    Only the next version on top of our newest, signed by every aggregator including us
    (so we computed it ourselves), and only with a stateless server optimiser: the next
    round's algorithm is on the card, an optimiser's moments are not. A release we already
    hold (the retained one, seen again) is ignored; anything else raises MessageRejected
    with the way to recover."""
    latest = registry.latest(config.study_id)
    have = 0 if latest is None else latest.record.version
    if release.version <= have:
        return
    parent = GENESIS_PARENT if latest is None else latest.record.model_hash
    if (
        release.version != have + 1
        or release.parent_hash != parent
        or config.aggregator_id not in dict(release.signatures)
    ):
        raise MessageRejected(
            f"release version {release.version} is not one this aggregator helped compute "
            f"on top of its version {have}; restore its registry from another aggregator"
        )
    if config.strategy.optimizer != "none":
        raise MessageRejected(
            f"release version {release.version} was missed across a restart and the "
            f"server optimiser {config.strategy.optimizer!r} keeps state that only "
            "the other aggregators hold; restore this aggregator's state from theirs"
        )
    keys = {a: roster.aggregator_signing[a] for a in roster.aggregator_ids}
    card = card_from_bytes(verify_release(release, keys).card)
    switches = card["strategy"]["switches"]
    following = switches[-1]["to"] if switches else card["strategy"]["algorithm"]
    state = latest_server_state(registry, config.study_id)
    registry.register(release, keys, server_state=state, next_algorithm=following)
    log.warning(
        Event.RELEASE_CAUGHT_UP,
        extra={"fields": {"round": release.round, "version": release.version}},
    )
