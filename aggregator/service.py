"""The aggregator's protocol as an event-driven object over explicit state (no MQTT here).

`AggregatorService` takes messages in (`on_message(topic, payload)`), time in (`tick(now)`)
and, for the leader, `open_round()`; each returns the `Outgoing` messages to publish, and the
transport (aggregator.daemon) only moves bytes. Every message is a signed envelope, opened
with the roster's keys and checked against this aggregator's own round; whatever fails is
logged (event, round, reason: never share content, never PHI) and dropped. `on_message`
never raises for bad input.

It holds keys, store, registry, the Publisher that signs what it sends, the round in
progress (`current`, a RoundContext that persists each move), the signature exchange, the
privacy-audit phase where the study requires one, and the StudyTerms every RoundOpen is held
to. The round's steps, in the order of docs/architecture.md section 3, each over pure
helpers:

1. open: the leader signs RoundOpen; the others hold it to their terms (aggregator.leader);
4. admit: each ShareEnvelope is checked, opened and accumulated (aggregator.admission);
5. agree: at the deadline or once every expected node reported, a signed ReceivedSet; the
   leader publishes their intersection or aborts below k (aggregator.agreement);
6. sum: each aggregator checks the set itself, sends its one partial sum (aggregator.partials);
7. combine: with the S-1 others, a signed release (aggregator.release_build); where the
   study requires it, a candidate that the privacy audit gates (aggregator.audit_phase);
8. sign and release: signature notes, then the leader's fully signed release, retained
   (aggregator.signature_exchange). What survives a restart: aggregator.catch_up. A node
   that holds a release damaged asks for it again: aggregator.release_copies.

Order does not matter within a round: what arrives early is kept (first copy wins) and used
when this aggregator is ready. A round past collecting aborts at the agreement timeout (from
the deadline, or from the candidate's audit deadline), except at a follower whose signature
note is out: the leader alone decides between the release and a RoundAbort, so that the two
never end a round differently. A RoundAbort is retained: it replaces the retained RoundOpen.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping

import numpy as np

from aggregator.agreement import intersect_received, retry_set
from aggregator.audit_phase import AuditPhase
from aggregator.catch_up import catch_up
from aggregator.config import AggregatorConfig
from aggregator.errors import AggregateRefused, AgreementFailed, MessageRejected, PartialSumRejected
from aggregator.leader import StudyTerms, check_base_reopenable, check_round_open, plan_round
from aggregator.partials import combine_round, open_partial_sums
from aggregator.privacy_gate import AuditSetup
from aggregator.registry import Registry
from aggregator.release_copies import ReleaseCopies
from aggregator.round_context import BaseModel, RoundContext, base_model
from aggregator.rounds import Abort, CollectionClosed, PartialSumPublished, Stage, StartCollecting
from aggregator.signature_exchange import SignatureExchange
from aggregator.signed_messages import Outgoing, Publisher, RosterKeys, ServiceKeys, open_routed
from aggregator.store import Store
from broker import topics
from tessera.crypto.flatten import flatten
from tessera.crypto.update_layout import vector_length
from tessera.errors import DiskFull, TesseraError
from tessera.observability.events import Event
from tessera.wire.envelopes import Message
from tessera.wire.messages import (
    ModelRelease,
    PartialSum,
    ParticipantSet,
    ReceiptSet,
    ReceivedSet,
    ReleaseRequest,
    RoundAbort,
    RoundOpen,
    ShareEnvelope,
)
from tessera.wire.release import is_signature_note

__all__ = ["AggregatorService", "Outgoing", "RosterKeys", "ServiceKeys"]

log = logging.getLogger("tessera.aggregator.service")


class AggregatorService:
    """One aggregator's protocol state machine (see the module docstring)."""

    def __init__(
        self,
        config: AggregatorConfig,
        keys: ServiceKeys,
        roster: RosterKeys,
        store: Store,
        registry: Registry,
        clock: Callable[[], float],
        *,
        genesis: Mapping[str, np.ndarray],
        export_onnx: Callable[[Mapping[str, np.ndarray], int], bytes],
        terms: StudyTerms,
        audit: AuditSetup | None = None,
    ) -> None:
        self.config, self.keys, self.roster, self.terms = config, keys, roster, terms
        self.k = terms.k_for(config)  # k_eff: the smallest set this aggregator ever sums
        self.me = config.aggregator_id
        self.store, self.registry, self.clock = store, registry, clock
        self.genesis, self.export_onnx = genesis, export_onnx
        self.signers = roster.signers()  # refuses an id that names an aggregator and a node
        self.publisher = Publisher(config.aggregator_id, keys.signing)
        self.current: RoundContext | None = None
        self.signing = SignatureExchange(config, roster, registry, self.publisher)
        self.copies = ReleaseCopies(config, roster, registry, clock)
        # Set only when the study requires a privacy audit before every release.
        self.audit = audit if audit is not None and audit.required(config.study_id) else None
        self.auditing = (
            None if self.audit is None else AuditPhase(self.audit, config, self.publisher, clock)
        )

    # --- messages and time in ----------------------------------------------------------------

    def on_message(self, topic: str, payload: bytes) -> list[Outgoing]:
        """Handle one message; a rejected one is logged and answers []. Never raises for
        bad input (a bug in this code still raises, and so does DiskFull: the daemon waits
        for space, then starts over as after a restart)."""
        kind: topics.Kind | None = None
        try:
            kind = topics.parse(topic).kind
            if kind is topics.Kind.AUDIT:
                return self._on_audit_report(topics.parse(topic), payload)
            step = self._step_for(kind)
            if step is None:
                return []
            signed = open_routed(topic, payload, self.signers, self.me)
            if signed is None:
                return []  # our own publication, echoed by the broker
            return step(signed.message, signed.signer_id)
        except DiskFull:
            raise
        except (TesseraError, ValueError) as exc:
            # ValueError covers CodecError and the admission errors; no share content or
            # site data is in these messages, and AuthenticationError stays vague.
            held = None if self.current is None else self.current.state.round
            name = None if kind is None else kind.name
            fields = {"kind": name, "error": type(exc).__name__, "reason": str(exc), "round": held}
            sender = topics.member_writer(topic)
            if sender is not None:  # a member's: its repeats are logged in aggregate
                fields["sender"] = sender
            log.warning(Event.MESSAGE_REJECTED, extra={"fields": fields})
            return []

    def _step_for(self, kind: topics.Kind) -> Callable[[Message, str], list[Outgoing]] | None:
        """The step for a topic kind; None for kinds an aggregator does not act on."""
        return {
            topics.Kind.ROUND: self._on_round,
            topics.Kind.SHARE: self._on_share,
            topics.Kind.RECEIVED: self._on_received,
            topics.Kind.PARTICIPANTS: self._on_participants,
            topics.Kind.PARTIAL: self._on_partial,
            topics.Kind.RELEASE: self._on_release,
            topics.Kind.FETCH: self._on_fetch,
        }.get(kind)

    def tick(self, now: float | None = None) -> list[Outgoing]:
        """Advance on time: close collection at the deadline, run the gate at the audit
        deadline, abort a stalled round (see the module docstring on timeouts)."""
        current = self.current
        if current is None or current.is_over:
            return []
        now_ms = int((self.clock() if now is None else now) * 1000)
        if current.state.stage is Stage.COLLECTING:
            return self._maybe_close(now_ms)
        if current.note_sent:
            return []  # the leader decides: its release, or its RoundAbort
        audit_due = current.audit_deadline_ms
        if current.built is None and audit_due is not None and now_ms >= audit_due:
            return self._gate(final=True)
        if now_ms >= current.stall_ms:
            return self._abort("the round did not finish within the agreement timeout")
        return []

    def _round_of(self, message: Message, **more: object) -> RoundContext:
        """The current round, after checking the message belongs to it."""
        if self.current is None:
            raise MessageRejected("no round is open at this aggregator")
        self.current.check(message, **more)
        return self.current

    # --- 1. open -----------------------------------------------------------------------------

    def open_round(
        self, expected_nodes: tuple[str, ...], available: Collection[str] | None = None
    ) -> list[Outgoing]:
        """Leader only: plan the next round over `expected_nodes`, record it, sign RoundOpen.
        On a base model summed without a release, BaseModelSpent unless `expected_nodes` (and
        `available`, the nodes online, where given) include every node of that sum."""
        if self.current is not None and not self.current.is_over:
            self._abort("superseded by the next round")
        base = base_model(self.registry, self.config.study_id, self.genesis)
        vector, _ = flatten(base.params)
        stored = self.store.server_state(self.config.study_id)
        latest = self.store.latest_round(self.config.study_id) or 0
        spent = self.store.published_on_base(self.config.study_id, base.weights_hash())
        check_base_reopenable(latest + 1, spent, expected_nodes, available)
        announcement = plan_round(
            self.config,
            round_number=latest + 1,
            base_model_hash=base.weights_hash(),
            model_version=base.version,
            algorithm=stored.algorithm if stored else self.config.round.algorithm,
            aggregator_ids=self.roster.aggregator_ids,
            expected_nodes=expected_nodes,
            vector_length=vector_length(vector.size),
            now_ms=int(self.clock() * 1000),
        )
        self._begin(announcement, base)
        topic = topics.round_topic(announcement.federation_id, announcement.study_id)
        return [self.publisher.send(topic, announcement, retain=True)]

    def _on_round(self, message: Message, signer: str) -> list[Outgoing]:
        if isinstance(message, RoundAbort):
            current = self._round_of(message)
            if signer not in current.announcement.aggregator_ids or current.is_over:
                return []
            current.move(Abort(f"aborted by {signer}: {message.reason}"))
            return []
        if not isinstance(message, RoundOpen):
            raise MessageRejected(f"{type(message).__name__} on the round topic")
        base = base_model(self.registry, self.config.study_id, self.genesis)
        check_round_open(message, signer, self.config, terms=self.terms,
                         aggregator_ids=self.roster.aggregator_ids, base=base.weights_hash(),
                         held_round=self.store.latest_round(self.config.study_id),
                         now_ms=int(self.clock() * 1000))  # fmt: skip
        if self.current is not None and not self.current.is_over:
            self.current.move(Abort("superseded by the next round"))
        self._begin(message, base)
        return self._maybe_close(None)

    def _begin(self, announcement: RoundOpen, base: BaseModel) -> None:
        """Record the announced round on top of `base`, hold it, and start collecting."""
        self.current = RoundContext.open(
            announcement,
            me=self.me,
            base=base,
            store=self.store,
            agreement_timeout_s=self.config.round.agreement_timeout_s,
        )
        self.current.move(StartCollecting())

    # --- 4. admit shares ---------------------------------------------------------------------

    def _on_share(self, message: Message, signer: str) -> list[Outgoing]:
        if not isinstance(message, ShareEnvelope):
            raise MessageRejected(f"{type(message).__name__} on a share topic")
        if not self._round_of(message).admit_share(message, self.me, self.keys.hpke):
            return []  # a second copy: the first one counts
        return self._maybe_close(None)

    # --- 5. agree ----------------------------------------------------------------------------

    def _maybe_close(self, now_ms: int | None) -> list[Outgoing]:
        """Close collection once the deadline passed or all nodes reported; send the
        ReceivedSet (the leader keeps its own) and then tell the sites which statements it
        holds (ReceiptSet: commitments only). In that order: the outbox sends in order, and
        the round waits on the ReceivedSet, not on the receipts."""
        current = self.current
        held = None if current is None else current.close_collection(now_ms)
        if current is None or held is None:
            return []
        commitments = current.commitments(held)
        a = current.announcement
        receipts = ReceiptSet(a.federation_id, a.study_id, a.round, self.me, commitments)
        told = self.publisher.send(topics.receipts_topic(a.federation_id, a.study_id, self.me),
                                   receipts)  # fmt: skip
        if self.config.is_leader:
            current.received[self.me] = dict(zip(held, commitments, strict=True))
            return [*self._maybe_agree(), told]
        received = ReceivedSet(a.federation_id, a.study_id, a.round, self.me, held, commitments)
        topic = topics.received_topic(a.federation_id, a.study_id, self.me)
        return [self.publisher.send(topic, received), told]

    def _on_received(self, message: Message, signer: str) -> list[Outgoing]:
        if not isinstance(message, ReceivedSet) or not self.config.is_leader:
            return []
        self._round_of(message).keep_received(signer, message.statements())
        return self._maybe_agree()

    def _maybe_agree(self) -> list[Outgoing]:
        """Leader: once every ReceivedSet is in, publish the intersection (on a base model
        summed before, the set the retry rule allows) or abort: below k, or no such set."""
        current = self.current
        assert current is not None
        a = current.announcement
        missing = set(a.aggregator_ids) - set(current.received)
        if current.state.stage is not Stage.AGREEING or missing:
            return []
        try:
            consistent = current.consistent_received()  # statements that differ: left out
            agreed = intersect_received(
                consistent, a.aggregator_ids, a.expected_nodes, a.min_participants
            )
            prior = self.store.published_on_base(a.study_id, a.base_model_hash)
            agreed = retry_set(agreed, prior, max(self.k, a.min_participants))
        except AgreementFailed as exc:
            return self._abort(exc.reason)
        participants = ParticipantSet(a.federation_id, a.study_id, a.round, self.me, agreed)
        topic = topics.participants_topic(a.federation_id, a.study_id)
        return [self.publisher.send(topic, participants), *self._sum(participants)]

    def _on_participants(self, message: Message, signer: str) -> list[Outgoing]:
        if not isinstance(message, ParticipantSet):
            return []
        current = self._round_of(message)
        leader = current.announcement.leader_id
        if signer != leader or message.leader_id != leader:
            raise MessageRejected(f"ParticipantSet signed by {signer!r}, not the round's leader")
        if current.state.stage is Stage.COLLECTING:
            current.move(CollectionClosed("participant-set"))
        return self._sum(message)

    # --- 6. sum ------------------------------------------------------------------------------

    def _sum(self, participants: ParticipantSet) -> list[Outgoing]:
        """Check the set ourselves, commit the one partial sum, seal and send it."""
        current = self.current
        assert current is not None
        a = current.announcement
        sums = current.partial_sums_for(participants, self.me, self.roster.aggregator_hpke, self.k)
        out = [
            self.publisher.send(
                topics.partial_topic(a.federation_id, a.study_id, m.to_aggregator, self.me), m
            )
            for m in sums
        ]
        current.move(PartialSumPublished())
        return out + self._maybe_combine()

    # --- 7. combine (and, where the study requires it, audit) --------------------------------

    def _on_partial(self, message: Message, signer: str) -> list[Outgoing]:
        if not isinstance(message, PartialSum):
            return []
        self._round_of(message, to_aggregator=self.me).keep_partial(message, signer)
        return self._maybe_combine()

    def _maybe_combine(self) -> list[Outgoing]:
        """With all S-1 other partial sums in, combine and check the aggregate (a refused one
        aborts the round), build and sign the release (or, audited, the candidate)."""
        current = self.current
        assert current is not None
        a = current.announcement
        others = set(a.aggregator_ids) - {self.me}
        waiting = others - set(current.partials)
        if current.state.stage is not Stage.COMBINING or current.built or waiting:
            return []
        assert current.set_hash is not None and current.own_partial is not None
        received = {other: current.partials[other] for other in others}
        participants = current.state.participants or ()
        try:
            vectors = open_partial_sums(
                current.own_partial, received, a, self.me, self.keys.hpke, current.set_hash
            )
            decoded = combine_round(vectors, a, len(participants))  # checked before any use
        except (PartialSumRejected, AggregateRefused) as exc:
            return self._abort(str(exc))
        try:
            built = current.build_release(
                decoded, self.registry, self.config, self.export_onnx, self.keys.signing
            )
        except (TesseraError, ValueError) as exc:
            # The partial sums are all in and will not change: nothing can come of waiting
            # for the agreement timeout (issue 19, point 9: a card refused an infinite
            # dispersion, and the round sat for minutes). Abort now, with the reason.
            return self._abort(f"release not built: {exc}")
        if self.auditing is None:
            current.built = built
            return self.signing.begin(current)
        return self.auditing.open(current, built) + self._gate(final=False)

    def _on_audit_report(self, topic: topics.Topic, payload: bytes) -> list[Outgoing]:
        """A site's signed report of the candidate (aggregator.audit_phase)."""
        if self.auditing is None:
            return []
        self.auditing.admit_report(topic, payload, self.current)
        return self._gate(final=False)

    def _gate(self, final: bool) -> list[Outgoing]:
        """The release gate (aggregator.audit_phase): a pass goes on to the signatures,
        a hold aborts the round; [] while reports are still due."""
        current = self.current
        if self.auditing is None or current is None:
            return []
        decision = self.auditing.gate(current, final)
        if decision is None:
            return []
        if not decision.release:
            return self._abort(f"release held ({decision.reason}): {decision.detail}")
        return self.signing.begin(current)

    # --- 8. sign and release (aggregator.signature_exchange) ---------------------------------

    def _on_release(self, message: Message, signer: str) -> list[Outgoing]:
        if not isinstance(message, ModelRelease):
            return []
        current = self.current
        missed = current is None or current.state.round != message.round
        if missed and not is_signature_note(message):  # a release we signed before a restart
            catch_up(message, self.config, self.roster, self.registry, self.store)
            return []
        return self.signing.on_release(self._round_of(message), message, signer)

    def _on_fetch(self, message: Message, signer: str) -> list[Outgoing]:
        """A node asks again for a release it holds damaged (aggregator.release_copies)."""
        if not isinstance(message, ReleaseRequest):
            raise MessageRejected(f"a {type(message).__name__} on a release request topic")
        return self.copies.answer(message, signer)

    # --- a round that ends without a model ---------------------------------------------------

    def _abort(self, reason: str) -> list[Outgoing]:
        """Abort the current round and say so, retained: it replaces the retained RoundOpen,
        so a late node does not train."""
        current = self.current
        assert current is not None
        current.move(Abort(reason))
        a = current.announcement
        log.warning(Event.ROUND_ABORTED, extra={"fields": {"round": a.round, "reason": reason}})
        abort = RoundAbort(a.federation_id, a.study_id, a.round, self.me, reason)
        topic = topics.round_topic(a.federation_id, a.study_id)
        return [self.publisher.send(topic, abort, retain=True)]
