"""The aggregator's protocol as an event-driven object over explicit state (no MQTT here).

`AggregatorService` takes messages in (`on_message(topic, payload)`), time in (`tick(now)`)
and, for the leader, `open_round()`; each returns the `Outgoing` messages to publish. The
transport (the later `tessera aggregator run`) only moves bytes. Every message is a signed
envelope, opened with the roster's keys and checked against this aggregator's own round
state; whatever fails is logged (event, round, reason: never share content, never PHI) and
dropped. `on_message` never raises for bad input.

Flow per round (DESIGN.md section 3): RoundOpen (leader signs; followers verify) ->
ShareEnvelope (admission, open, accumulate; the first copy wins) -> at the deadline or once
every expected node reported, a signed ReceivedSet -> the leader intersects and publishes
the ParticipantSet, or a RoundAbort below k -> each aggregator checks the set, publishes its
one partial sum -> on the S-1 others: combine, strategy, release, signature exchange
(aggregator.release_build) -> the leader publishes the fully signed release, retained.

Where the study requires a privacy audit (`audit`, aggregator.privacy_gate), the release
built after combining is a candidate: the leader publishes it, signed by itself only, to
each participant's own candidate topic (no other site can read it); each participating
site audits it and publishes a signed report of aggregate figures; each aggregator checks
every report against its *own* candidate (so a leader cannot have sites audit another
model) and, once every participant reported, runs the gate. A pass re-cards the release
with the figures and the signature exchange follows; a hold (a site over the study's
limit, or reports missing at `round.audit_timeout_s`) is written to the audit log and
aborts the round: nothing is released.

Timeouts: a round that is past collecting aborts at the agreement timeout (counted from
the deadline, or from the candidate's audit deadline). A follower that has sent its
signature note no longer times out by itself: the leader alone decides between the release
and a RoundAbort, so the two can never end a round differently (the follower used to abort
at its timeout while the leader registered the release, and the federation split).

Order does not matter within a round: a ReceivedSet, partial sum or signature note that
arrives before this aggregator is ready is kept (first copy wins) and used when it is. The
leader keeps its own ReceivedSet instead of publishing it. A RoundAbort is published
retained so that it replaces the retained RoundOpen. A round is not resumed after a
restart: the caller runs `store.recover()` first (it aborts rounds in flight and deletes
their shares), and the service starts with no round until the next RoundOpen. One thing
of a round survives a restart: a follower killed after sending its signature note takes
over the leader's release when it arrives (the broker retains it), if it is the next
version on top of its own and bears its own signature (`_catch_up`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

from aggregator.admission import (
    check_share_envelope,
    collection_close_reason,
    open_share,
)
from aggregator.agreement import check_partial_sum_request, intersect_received
from aggregator.errors import (
    AgreementFailed,
    DuplicateShare,
    MessageRejected,
)
from aggregator.leader import plan_round
from aggregator.model_card import card_from_bytes
from aggregator.partials import open_partial_sum, seal_partial_sums
from aggregator.privacy_gate import ReleaseCandidate, card_figures, check_report, gate_release
from aggregator.registry import GENESIS_PARENT, weights_bytes
from aggregator.release_build import (
    BuiltRelease,
    add_noted_signature,
    build_signed_release,
    carry_epsilon,
    signature_note,
    with_audit_figures,
)
from aggregator.rounds import (
    Abort,
    CandidateBuilt,
    CollectionClosed,
    Event,
    ModelReleased,
    PartialSumPublished,
    ParticipantsAgreed,
    ShareAccepted,
    Stage,
    transition,
)
from aggregator.service_core import ServiceCore
from aggregator.service_state import (
    Outgoing,
    RosterKeys,
    ServiceKeys,
    check_topic,
)
from aggregator.strategies import ServerState, server_state_from_bytes
from broker import topics
from tessera.crypto.flatten import flatten
from tessera.crypto.update_layout import vector_length
from tessera.errors import AuthenticationError, TesseraError
from tessera.governance.privacy_report import report_from_json, verify_report
from tessera.wire.envelopes import Message, open_envelope, require_fields, seal_envelope
from tessera.wire.messages import (
    ModelRelease,
    PartialSum,
    ParticipantSet,
    ReceivedSet,
    RoundAbort,
    RoundOpen,
    ShareEnvelope,
)
from tessera.wire.release import is_signature_note, verify_release

__all__ = ["AggregatorService", "Outgoing", "RosterKeys", "ServiceKeys"]

log = logging.getLogger("tessera.aggregator.service")
MAX_MESSAGE = 512 * 1024 * 1024
MAX_AUDIT_REPORT = 64 * 1024  # a report is a few kilobytes of aggregate figures


class AggregatorService(ServiceCore):
    """One aggregator's protocol state machine (see the module docstring)."""

    def _handler(self, kind: topics.Kind) -> Callable[[Message, str], list[Outgoing]] | None:
        """The step for a topic kind; None for kinds an aggregator does not act on."""
        return {
            topics.Kind.ROUND: self._on_round,
            topics.Kind.SHARE: self._on_share,
            topics.Kind.RECEIVED: self._on_received,
            topics.Kind.PARTICIPANTS: self._on_participants,
            topics.Kind.PARTIAL: self._on_partial,
            topics.Kind.RELEASE: self._on_release,
        }.get(kind)

    def _move(self, event: Event) -> None:
        """Move and persist the round; once it is over (released or aborted), delete its
        shares, seeds and files alike: nothing secret outlives its round."""
        super()._move(event)
        assert self.current is not None
        if self.current.state.stage.is_terminal:
            self.store.purge_shares(self.config.study_id, self.current.state.round)

    # --- the leader opens ------------------------------------------------------------------

    def open_round(self, expected_nodes: tuple[str, ...]) -> list[Outgoing]:
        """Leader only: plan the next round over `expected_nodes`, record it, sign RoundOpen."""
        if self.current is not None and not self.current.state.stage.is_terminal:
            self._abort("superseded by the next round")
        params, _, _ = self._base()
        vector, _ = flatten(params)
        stored = self.store.server_state(self.config.study_id)
        latest = self.store.latest_round(self.config.study_id) or 0
        announcement = plan_round(
            self.config,
            round_number=latest + 1,
            base_model_hash=hashlib.sha256(weights_bytes(params)).digest(),
            model_version=self._base()[1],
            algorithm=stored.algorithm if stored else self.config.round.algorithm,
            aggregator_ids=self.roster.aggregator_ids,
            expected_nodes=expected_nodes,
            vector_length=vector_length(vector.size),
            now_ms=int(self.clock() * 1000),
        )
        self._begin(announcement)
        topic = topics.round_topic(announcement.federation_id, announcement.study_id)
        return [self._send(topic, announcement, retain=True)]

    # --- messages in -----------------------------------------------------------------------

    def on_message(self, topic: str, payload: bytes) -> list[Outgoing]:
        """Handle one message; a rejected one is logged and answers []. Never raises for
        bad input (a bug in this code still raises)."""
        kind: topics.Kind | None = None
        try:
            kind = topics.parse(topic).kind
            if kind is topics.Kind.AUDIT:
                return self._on_audit_report(topics.parse(topic), payload)
            handler = self._handler(kind)
            if handler is None:
                return []
            signed = open_envelope(payload, self._keys_all, MAX_MESSAGE)
            if signed.signer_id == self.me:
                return []  # our own publication, echoed by the broker
            check_topic(topics.parse(topic), signed.message)
            return handler(signed.message, signed.signer_id)
        except (TesseraError, ValueError) as exc:
            # ValueError covers CodecError and the admission errors; no share content or
            # site data is in these messages, and AuthenticationError stays vague.
            log.warning(
                "message-rejected",
                extra={
                    "fields": {
                        "kind": None if kind is None else kind.name,
                        "error": type(exc).__name__,
                        "reason": str(exc),
                        "round": None if self.current is None else self.current.state.round,
                    }
                },
            )
            return []

    def _on_round(self, message: Message, signer: str) -> list[Outgoing]:
        if isinstance(message, RoundAbort):
            current = self._context(message)
            if signer not in current.announcement.aggregator_ids or current.state.stage.is_terminal:
                return []
            self._move(Abort(f"aborted by {signer}: {message.reason}"))
            return []
        if not isinstance(message, RoundOpen):
            raise MessageRejected(f"{type(message).__name__} on the round topic")
        if signer != self.config.leader_id or message.leader_id != signer:
            raise MessageRejected(
                f"RoundOpen signed by {signer!r}, the leader is {self.config.leader_id!r}"
            )
        require_fields(
            message, federation_id=self.config.federation_id, study_id=self.config.study_id
        )
        if self.current is not None and message.round <= self.current.state.round:
            raise MessageRejected(f"RoundOpen for round {message.round} is not new")
        params, _, _ = self._base()
        if message.base_model_hash != hashlib.sha256(weights_bytes(params)).digest():
            raise MessageRejected(
                f"round {message.round} starts from a base model this aggregator does not hold"
            )
        if self.current is not None and not self.current.state.stage.is_terminal:
            self._move(Abort("superseded by the next round"))
        self._begin(message)
        return self._maybe_close(None)

    def _on_share(self, message: Message, signer: str) -> list[Outgoing]:
        if not isinstance(message, ShareEnvelope):
            raise MessageRejected(f"{type(message).__name__} on a share topic")
        current = self._context(message)
        check_share_envelope(message, current.announcement, self.me, current.state.stage)
        share = open_share(message, current.announcement, self.me, self.keys.hpke)
        digest = hashlib.sha256(message.sealed).digest()
        try:
            current.accumulator.add(message.node_id, share, envelope_digest=digest)
        except DuplicateShare:
            log.info(
                "share-duplicate",
                extra={"fields": {"round": message.round}},
            )
            return []
        current.epsilon[message.node_id] = message.epsilon_total
        self._move(ShareAccepted(message.node_id))
        return self._maybe_close(None)

    def tick(self, now: float | None = None) -> list[Outgoing]:
        """Advance on time: close collection at the deadline, run the gate at the audit
        deadline, abort a stalled round (see the module docstring on timeouts)."""
        current = self.current
        if current is None or current.state.stage.is_terminal:
            return []
        now_ms = int((self.clock() if now is None else now) * 1000)
        if current.state.stage is Stage.COLLECTING:
            return self._maybe_close(now_ms)
        if current.note_sent:
            return []  # the leader decides: its release, or its RoundAbort
        audit_due = current.audit_deadline_ms
        if current.built is None and audit_due is not None and now_ms >= audit_due:
            return self._maybe_gate(final=True)
        if now_ms >= current.stall_ms:
            return self._abort("the round did not finish within the agreement timeout")
        return []

    def _maybe_close(self, now_ms: int | None) -> list[Outgoing]:
        """Step 5: publish the ReceivedSet once the deadline passed or all nodes reported."""
        current = self.current
        if current is None or current.state.stage is not Stage.COLLECTING:
            return []
        a = current.announcement
        if now_ms is None and current.state.received < len(a.expected_nodes):
            return []  # on a share, before everyone reported: nothing to read (O(1), not O(N))
        held = self.store.held_nodes(a.study_id, a.round)
        if now_ms is None:  # on a share: only "everyone reported" can close early
            reason = "all-reported" if set(a.expected_nodes) <= set(held) else None
        else:
            reason = collection_close_reason(now_ms, a.deadline_ms, held, a.expected_nodes)
        if reason is None:
            return []
        self._move(CollectionClosed(reason))
        if self.config.is_leader:
            current.received[self.me] = held
            return self._maybe_agree()
        received = ReceivedSet(a.federation_id, a.study_id, a.round, self.me, held)
        return [self._send(topics.received_topic(a.federation_id, a.study_id, self.me), received)]

    def _on_received(self, message: Message, signer: str) -> list[Outgoing]:
        if not isinstance(message, ReceivedSet) or not self.config.is_leader:
            return []
        current = self._context(message)
        if signer not in current.announcement.aggregator_ids or signer in current.received:
            raise MessageRejected(f"ReceivedSet from {signer!r} is unexpected or repeated")
        current.received[signer] = tuple(message.node_ids)
        return self._maybe_agree()

    def _maybe_agree(self) -> list[Outgoing]:
        """Leader: once every ReceivedSet is in, publish the intersection or abort below k."""
        current = self.current
        assert current is not None
        a = current.announcement
        if current.state.stage is not Stage.AGREEING or set(a.aggregator_ids) - set(
            current.received
        ):
            return []
        try:
            agreed = intersect_received(
                current.received, a.aggregator_ids, a.expected_nodes, a.min_participants
            )
        except AgreementFailed as exc:
            return self._abort(exc.reason)
        participants = ParticipantSet(a.federation_id, a.study_id, a.round, self.me, agreed)
        out = [self._send(topics.participants_topic(a.federation_id, a.study_id), participants)]
        return out + self._agree(participants)

    def _on_participants(self, message: Message, signer: str) -> list[Outgoing]:
        if not isinstance(message, ParticipantSet):
            return []
        current = self._context(message)
        leader = current.announcement.leader_id
        if signer != leader or message.leader_id != leader:
            raise MessageRejected(f"ParticipantSet signed by {signer!r}, not the round's leader")
        if current.state.stage is Stage.COLLECTING:
            self._move(CollectionClosed("participant-set"))
        return self._agree(message)

    def _agree(self, participants: ParticipantSet) -> list[Outgoing]:
        """Step 6: check the set ourselves, commit the one partial sum, seal and send it."""
        current = self.current
        assert current is not None
        a = current.announcement
        members = check_partial_sum_request(
            round_number=a.round,
            requested=participants.node_ids,
            requested_hash=participants.digest(),
            held=self.store.held_nodes(a.study_id, a.round),
            expected_nodes=a.expected_nodes,
            min_participants=a.min_participants,
            already_published=self.store.published_sum(a.study_id, a.round),
        )
        current.state = transition(current.state, ParticipantsAgreed(members))
        current.set_hash = participants.digest()
        self.store.decide_partial_sum(a.study_id, current.state, current.set_hash)
        current.own_partial = current.accumulator.finalize(members)
        sealed = seal_partial_sums(
            current.own_partial, a, self.me, current.set_hash, self.roster.aggregator_hpke
        )
        out = [
            self._send(
                topics.partial_topic(a.federation_id, a.study_id, m.to_aggregator, self.me), m
            )
            for m in sealed
        ]
        self._move(PartialSumPublished())
        return out + self._maybe_combine()

    def _on_partial(self, message: Message, signer: str) -> list[Outgoing]:
        if not isinstance(message, PartialSum):
            return []
        current = self._context(message, to_aggregator=self.me)
        if signer not in current.announcement.aggregator_ids:
            raise MessageRejected(f"partial sum signed by {signer!r}, not an aggregator")
        if message.from_aggregator in current.partials:
            raise MessageRejected(
                f"second partial sum from {message.from_aggregator!r}; first wins"
            )
        current.partials[message.from_aggregator] = message  # opened once the set is agreed
        return self._maybe_combine()

    def _maybe_combine(self) -> list[Outgoing]:
        """Step 7: with all S-1 other partial sums in, build and sign the release."""
        current = self.current
        assert current is not None
        a = current.announcement
        others = set(a.aggregator_ids) - {self.me}
        if (
            current.state.stage is not Stage.COMBINING
            or current.built
            or others - set(current.partials)
        ):
            return []
        assert current.set_hash is not None and current.own_partial is not None
        vectors = {self.me: current.own_partial}
        for other in sorted(others):
            try:
                vectors[other] = open_partial_sum(
                    current.partials[other], a, self.me, self.keys.hpke, current.set_hash
                )
            except (TesseraError, ValueError) as exc:
                return self._abort(f"partial sum from {other} refused: {type(exc).__name__}")
        server_state = self._server_state()
        participants = current.state.participants or ()
        parent = self.registry.latest(a.study_id)
        epsilon = carry_epsilon(
            None if parent is None else parent.card,
            {node: current.epsilon[node] for node in participants},  # each sent a share
        )
        built = build_signed_release(
            config=self.config,
            announcement=a,
            partials=vectors,
            participants=len(participants),
            base_params=current.base_params,
            server_state=server_state,
            version=current.version,
            parent_hash=current.parent_hash,
            onnx=self.export_onnx,
            key=self.keys.signing,
            epsilon_per_site=epsilon,
        )
        if self.audit is None:
            current.built = built
            return self._exchange_signatures()
        return self._enter_audit(built)

    def _exchange_signatures(self) -> list[Outgoing]:
        """Step 8 with `current.built`: the leader collects the notes, a follower sends one."""
        current = self.current
        assert current is not None and current.built is not None
        if self.config.is_leader:
            return self._maybe_release()
        a = current.announcement
        current.note_sent = True
        note = signature_note(current.built.release, self.me)
        return [self._send(topics.release_topic(a.federation_id, a.study_id), note)]

    # --- the privacy audit of a candidate (studies that require one) ---------------------

    def _enter_audit(self, candidate: BuiltRelease) -> list[Outgoing]:
        """Keep the candidate, check the reports that came early, and (leader) publish it
        for the participating sites to audit."""
        current = self.current
        assert current is not None and self.audit is not None
        a = current.announcement
        current.candidate = candidate
        self._move(CandidateBuilt())
        current.audit_deadline_ms = self._now_ms() + self._ms(self.config.round.audit_timeout_s)
        current.stall_ms = current.audit_deadline_ms + self._ms(
            self.config.round.agreement_timeout_s
        )
        early, current.reports = current.reports, {}
        for site, report in sorted(early.items()):
            try:
                check_report(report, self.audit.manifest, self._candidate(), current.reports)
            except TesseraError as exc:
                self._reject_report(exc)
                continue
            current.reports[site] = report
        log.info(
            "candidate-built",
            extra={"fields": {"round": a.round, "version": candidate.release.version}},
        )
        out = []
        if self.config.is_leader:  # one copy per participant: no other site sees the model
            envelope = seal_envelope(candidate.release, self.me, self.keys.signing)
            for node in current.state.participants or ():
                topic = topics.candidate_topic(a.federation_id, a.study_id, node)
                out.append(Outgoing(topic, envelope))
        return out + self._maybe_gate(final=False)

    def _candidate(self) -> ReleaseCandidate:
        current = self.current
        assert current is not None and current.candidate is not None
        return ReleaseCandidate(
            study_id=current.announcement.study_id,
            version=current.version,
            model_hash=current.candidate.release.model_hash,
            sites=frozenset(current.state.participants or ()),
        )

    def _on_audit_report(self, topic: topics.Topic, payload: bytes) -> list[Outgoing]:
        """A site's signed report: verified now, checked against our own candidate once it
        exists (a report may overtake this aggregator's combining); the first one wins."""
        if self.audit is None:
            return []
        if len(payload) > MAX_AUDIT_REPORT:
            raise MessageRejected(
                f"audit report of {len(payload)} bytes is over the limit of {MAX_AUDIT_REPORT}"
            )
        report = report_from_json(payload)
        routed = (topic.federation, topic.study, topic.node) == (
            report.federation_id, report.study_id, report.site_id,
        )  # fmt: skip
        if not routed:
            raise MessageRejected("audit report arrived on a topic meant for another")
        verify_report(report, self.audit.manifest)  # AuthenticationError, vague
        current = self.current
        if current is None or current.state.stage.is_terminal:
            raise MessageRejected("no round is waiting for audit reports")
        if report.model_round != current.state.round or report.study_id != self.config.study_id:
            raise MessageRejected(
                f"audit report is for round {report.model_round}, not round {current.state.round}"
            )
        if report.site_id in current.reports:
            raise MessageRejected(f"a second audit report from {report.site_id!r}; first wins")
        if current.candidate is not None:
            check_report(report, self.audit.manifest, self._candidate(), current.reports)
        current.reports[report.site_id] = report
        log.info(
            "audit-report",
            extra={"fields": {"round": report.model_round, "site": report.site_id}},
        )
        return self._maybe_gate(final=False)

    def _reject_report(self, exc: Exception) -> None:
        log.warning(
            "message-rejected",
            extra={"fields": {"kind": "AUDIT", "error": type(exc).__name__, "reason": str(exc)}},
        )

    def _maybe_gate(self, final: bool) -> list[Outgoing]:
        """The release gate, once every participant reported (or, `final`, at the audit
        deadline): a pass re-cards and signs the release, a hold aborts the round."""
        current = self.current
        if (
            self.audit is None
            or current is None
            or current.state.stage is not Stage.AUDITING
            or current.built is not None
        ):
            return []
        candidate = self._candidate()
        if not final and candidate.sites - set(current.reports):
            return []
        decision = gate_release(
            self.audit.manifest, candidate, current.reports.values(), self.audit.log
        )
        if not decision.release:
            return self._abort(f"release held ({decision.reason}): {decision.detail}")
        log.info(
            "audit-passed",
            extra={"fields": {"round": current.state.round, "detail": decision.detail}},
        )
        assert current.candidate is not None
        figures = card_figures(current.reports.values())
        current.built = with_audit_figures(current.candidate, figures, self.me, self.keys.signing)
        current.stall_ms = self._now_ms() + self._ms(self.config.round.agreement_timeout_s)
        return self._exchange_signatures()

    def _signing(self) -> bool:
        """True while this aggregator's release is built and its round is still open."""
        current = self.current
        return (
            current is not None
            and current.built is not None
            and current.state.stage in (Stage.COMBINING, Stage.AUDITING)
        )

    def _on_release(self, message: Message, signer: str) -> list[Outgoing]:
        if not isinstance(message, ModelRelease):
            return []
        current = self.current
        missed = current is None or current.state.round != message.round
        if missed and not is_signature_note(message):
            return self._catch_up(message)
        current = self._context(message)
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
            return self._maybe_release()
        built = current.built
        if built is None or not self._signing():
            raise MessageRejected("a release arrived before this aggregator computed its own")
        if message.model_hash != built.release.model_hash or self.me not in dict(
            message.signatures
        ):
            raise MessageRejected("the release differs from the model this aggregator computed")
        self._register(message)
        return []

    def _maybe_release(self) -> list[Outgoing]:
        """Leader, step 8: add every follower's noted signature; publish when all S signed."""
        current = self.current
        assert current is not None
        if current.built is None or not self._signing():
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
                    "message-rejected",
                    extra={"fields": {"round": release.round, "kind": "RELEASE"}},
                )
        if set(dict(release.signatures)) != set(current.announcement.aggregator_ids):
            return []
        self._register(release)
        a = current.announcement
        return [self._send(topics.release_topic(a.federation_id, a.study_id), release, retain=True)]

    def _catch_up(self, release: ModelRelease) -> list[Outgoing]:
        """Register a release of a round this aggregator no longer holds in memory: it
        signed the release, then restarted before the leader's copy arrived (the retained
        release comes again on reconnect). Without this, every later RoundOpen names a base
        model it does not hold, and the federation stops.

        Only the next version on top of our newest, signed by every aggregator including
        us (so we computed it ourselves), and only with a stateless server optimiser: the
        next round's algorithm is on the card, an optimiser's moments are not. A release we
        already hold (the retained one, seen again) is ignored."""
        latest = self.registry.latest(self.config.study_id)
        have = 0 if latest is None else latest.record.version
        if release.version <= have:
            return []
        parent = GENESIS_PARENT if latest is None else latest.record.model_hash
        if (
            release.version != have + 1
            or release.parent_hash != parent
            or self.me not in dict(release.signatures)
        ):
            raise MessageRejected(
                f"release version {release.version} is not one this aggregator helped compute "
                f"on top of its version {have}; restore its registry from another aggregator"
            )
        if self.config.strategy.optimizer != "none":
            raise MessageRejected(
                f"release version {release.version} was missed across a restart and the "
                f"server optimiser {self.config.strategy.optimizer!r} keeps state that only "
                "the other aggregators hold; restore this aggregator's state from theirs"
            )
        keys = {a: self.roster.aggregator_signing[a] for a in self.roster.aggregator_ids}
        card = card_from_bytes(verify_release(release, keys).card)
        switches = card["strategy"]["switches"]
        following = switches[-1]["to"] if switches else card["strategy"]["algorithm"]
        state = self._server_state()
        self.registry.register(release, keys, server_state=state, next_algorithm=following)
        log.warning(
            "release-caught-up",
            extra={"fields": {"round": release.round, "version": release.version}},
        )
        return []

    def _server_state(self) -> ServerState:
        """The server optimiser's state after the newest release (empty before the first)."""
        stored = self.store.server_state(self.config.study_id)
        if stored is None or stored.path is None:
            return ServerState()
        return server_state_from_bytes(Path(stored.path).read_bytes())

    def _register(self, release: ModelRelease) -> None:
        current = self.current
        assert current is not None and current.built is not None
        outcome = current.built.outcome
        keys = {a: self.roster.aggregator_signing[a] for a in current.announcement.aggregator_ids}
        self.registry.register(
            release, keys, server_state=outcome.server_state, next_algorithm=outcome.next_algorithm
        )
        self._move(ModelReleased(str(release.version)))
        log.info(
            "model-released",
            extra={"fields": {"round": release.round, "version": release.version}},
        )
