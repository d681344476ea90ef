"""A node's request for a release it holds damaged on disk: send it the registered release
again, to that node alone.

The broker retains only the newest release, and not at all one larger than a frame; a node
with a persistent session is not sent a retained message again. So a node that finds a
version's files damaged asks (`ReleaseRequest`, signed with its key, on its own fetch topic)
and any aggregator that registered that version answers with the signed release message it
keeps (`release.bin`) on the node's release copy topic, which the ACL lets only that site
read. The answer's authority is the joint signatures, which the node verifies as for any
release; the aggregator only checks who asks (a roster site, signing as itself) and answers
one node's version at most once per `RELEASE_REFETCH_INTERVAL_S`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aggregator.config import AggregatorConfig
from aggregator.errors import MessageRejected, RegistryError
from aggregator.registry import Registry
from aggregator.signed_messages import Outgoing, RosterKeys
from broker import topics
from tessera.limits import RELEASE_REFETCH_INTERVAL_S
from tessera.observability.events import Event
from tessera.wire.messages import ReleaseRequest

# One logger for all of the service's events, wherever the step lives.
log = logging.getLogger("tessera.aggregator.service")


class ReleaseCopies:
    """Answers `ReleaseRequest`s from the registry (see the module docstring)."""

    def __init__(
        self,
        config: AggregatorConfig,
        roster: RosterKeys,
        registry: Registry,
        clock: Callable[[], float],
    ) -> None:
        self.config, self.roster, self.registry, self.clock = config, roster, registry, clock
        self._sent: dict[tuple[str, int], float] = {}  # (node, version) -> when last sent

    def answer(self, message: ReleaseRequest, signer: str) -> list[Outgoing]:
        """The release to send `message`'s node, [] within the interval; MessageRejected for
        a request not from a roster site as itself, or for a version not registered."""
        if signer != message.node_id or signer not in self.roster.node_signing:
            raise MessageRejected(f"release request signed by {signer!r}, not by a roster site")
        key = (message.node_id, message.version)
        now = self.clock()
        last = self._sent.get(key)
        if last is not None and now - last < RELEASE_REFETCH_INTERVAL_S:
            return []
        try:
            shown = self.registry.show(self.config.study_id, message.version)
            data = shown.release_path.read_bytes()
        except (RegistryError, OSError) as error:
            raise MessageRejected(
                f"release version {message.version} cannot be sent again: {error}"
            ) from None
        if shown.record.round != message.round:
            raise MessageRejected(
                f"version {message.version} was released in round {shown.record.round}, "
                f"not {message.round}"
            )
        self._sent[key] = now
        topic = topics.release_copy_topic(
            self.config.federation_id, self.config.study_id, message.node_id
        )
        fields = {"node": message.node_id, "version": message.version}
        log.info(Event.RELEASE_RESENT, extra={"fields": fields})
        return [Outgoing(topic, data)]
