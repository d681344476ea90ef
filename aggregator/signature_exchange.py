"""Step 8, the signature exchange of a round's release (the scheme is in
aggregator.release_build): a follower sends its signature note, the leader adds every
follower's note to its own release and, once all S aggregators signed, registers the
release and publishes it, retained; a follower registers the leader's release only if it
is the model it computed itself and bears its own signature.

A note may arrive before the leader has built its own release: it is kept and checked then.
A follower that has sent its note no longer times out by itself (`RoundContext.note_sent`):
the leader alone decides between the release and a RoundAbort.

`SignatureExchange` keeps no round of its own: it works on the service's held RoundContext.
"""

from __future__ import annotations

import logging

from aggregator.config import AggregatorConfig
from aggregator.errors import MessageRejected
from aggregator.registry import Registry
from aggregator.release_build import add_noted_signature, signature_note
from aggregator.round_context import RoundContext
from aggregator.rounds import ModelReleased, Stage
from aggregator.signed_messages import Outgoing, Publisher, RosterKeys
from broker import topics
from tessera.errors import AuthenticationError
from tessera.observability.events import Event
from tessera.wire.messages import ModelRelease
from tessera.wire.release import is_signature_note

# One logger for all of the service's events, wherever the step lives.
log = logging.getLogger("tessera.aggregator.service")


def is_signing(current: RoundContext) -> bool:
    """True while this aggregator's release is built and its round is still open."""
    return current.built is not None and current.state.stage in (
        Stage.COMBINING,
        Stage.AUDITING,
    )


class SignatureExchange:
    """The leader's and the followers' side of step 8 (see the module docstring)."""

    def __init__(
        self,
        config: AggregatorConfig,
        roster: RosterKeys,
        registry: Registry,
        publisher: Publisher,
    ) -> None:
        self.config, self.roster, self.registry = config, roster, registry
        self.publisher = publisher

    def begin(self, current: RoundContext) -> list[Outgoing]:
        """With `current.built`: the leader collects the notes, a follower sends its own."""
        assert current.built is not None
        if self.config.is_leader:
            return self._maybe_release(current)
        a = current.announcement
        current.note_sent = True
        note = signature_note(current.built.release, self.publisher.sender)
        return [self.publisher.send(topics.release_topic(a.federation_id, a.study_id), note)]

    def on_release(
        self, current: RoundContext, message: ModelRelease, signer: str
    ) -> list[Outgoing]:
        """A signature note (leader: keep it, release once all signed) or the leader's
        final release (follower: register it if it is ours); MessageRejected otherwise."""
        if signer not in current.announcement.aggregator_ids:
            raise MessageRejected(f"release published by {signer!r}, not an aggregator")
        if is_signature_note(message):
            if not self.config.is_leader or message.signatures[0][0] != signer:
                return []
            if signer in current.notes:
                raise MessageRejected(f"a second signature note from {signer!r}; the first counts")
            if current.built is not None:  # else it waits, and is checked once we built ours
                add_noted_signature(
                    current.built.release, message, self.roster.aggregator_signing[signer]
                )
            current.notes[signer] = message
            return self._maybe_release(current)
        built = current.built
        if built is None or not is_signing(current):
            raise MessageRejected("a release arrived before this aggregator computed its own")
        if message.model_hash != built.release.model_hash or self.publisher.sender not in dict(
            message.signatures
        ):
            raise MessageRejected("the release differs from the model this aggregator computed")
        self._register(current, message)
        return []

    def _maybe_release(self, current: RoundContext) -> list[Outgoing]:
        """Leader: add every follower's noted signature; publish when all S signed."""
        if current.built is None or not is_signing(current):
            # A note that arrives after the round aborted (e.g. at the agreement timeout)
            # must not register the model: the other aggregators never will.
            return []
        release = current.built.release
        for signer, note in sorted(current.notes.items()):
            try:
                release = add_noted_signature(release, note, self.roster.aggregator_signing[signer])
            except AuthenticationError:  # an early note that does not match ours: forget it
                del current.notes[signer]
                log.warning(
                    Event.MESSAGE_REJECTED,
                    extra={"fields": {"round": release.round, "kind": "RELEASE"}},
                )
        if set(dict(release.signatures)) != set(current.announcement.aggregator_ids):
            return []
        self._register(current, release)
        a = current.announcement
        topic = topics.release_topic(a.federation_id, a.study_id)
        return [self.publisher.send(topic, release, retain=True)]

    def _register(self, current: RoundContext, release: ModelRelease) -> None:
        """Register the fully signed release with what the next round continues from."""
        assert current.built is not None
        outcome = current.built.outcome
        keys = {a: self.roster.aggregator_signing[a] for a in current.announcement.aggregator_ids}
        self.registry.register(
            release, keys, server_state=outcome.server_state, next_algorithm=outcome.next_algorithm
        )
        current.move(ModelReleased(str(release.version)))
        log.info(
            Event.MODEL_RELEASED,
            extra={"fields": {"round": release.round, "version": release.version}},
        )
