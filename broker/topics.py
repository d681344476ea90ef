"""The MQTT topic schema: one pure module, no paho.

Every topic lives under ``tessera/<federation>/``. Ids in topics are opaque, operator-chosen
site, aggregator, federation and study ids, never anything about patients. An id is 1-64
characters of ``[A-Za-z0-9._-]``, starting with a letter or digit (``tessera.wire.ids``, the
codec's id rule too), so that it can never be an MQTT wildcard, a level separator, or a
``$`` system topic.

    tessera/<fed>/<study>/round                      RoundOpen, RoundAbort  aggregators -> all
    tessera/<fed>/<study>/share/<aggregator>/<node>  ShareEnvelope          node -> aggregator
    tessera/<fed>/<study>/received/<aggregator>      ReceivedSet            aggregator -> aggs
    tessera/<fed>/<study>/receipts/<aggregator>      ReceiptSet             aggregator -> sites
                                                     (statement commitments, no node ids)
    tessera/<fed>/<study>/participants               ParticipantSet         leader -> aggs
    tessera/<fed>/<study>/partial/<to>/<from>        PartialSum             aggregator -> agg
    tessera/<fed>/<study>/release                    ModelRelease           aggregators -> all
    tessera/<fed>/<study>/fetch/<node>               ReleaseRequest         node -> aggregators
                                                     (a release held damaged, asked again)
    tessera/<fed>/<study>/release/<node>             ModelRelease           aggregator -> node
                                                     (that release, to that node alone)
    tessera/<fed>/<study>/candidate/<node>           ModelRelease (leader's  leader -> node
                                                     signature only): the model to audit,
                                                     one copy per participant
    tessera/<fed>/<study>/audit/<node>               PrivacyAuditReport      node -> aggregators
                                                     (signed JSON, aggregate figures only)
    tessera/<fed>/presence/<client>                  "online"/"offline"     each client, retained
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from broker.errors import TopicError
from tessera.errors import CodecError
from tessera.wire.ids import MAX_ID_LENGTH, check_id

__all__ = ["MAX_ID_LENGTH", "Kind", "Topic", "parse"]

ROOT = "tessera"


class Kind(Enum):
    """The kinds of topic in the schema; the value is the topic template."""

    ROUND = "tessera/{federation}/{study}/round"
    SHARE = "tessera/{federation}/{study}/share/{aggregator}/{node}"
    RECEIVED = "tessera/{federation}/{study}/received/{aggregator}"
    RECEIPTS = "tessera/{federation}/{study}/receipts/{aggregator}"
    PARTICIPANTS = "tessera/{federation}/{study}/participants"
    PARTIAL = "tessera/{federation}/{study}/partial/{to_aggregator}/{from_aggregator}"
    RELEASE = "tessera/{federation}/{study}/release"
    FETCH = "tessera/{federation}/{study}/fetch/{node}"
    RELEASE_COPY = "tessera/{federation}/{study}/release/{node}"
    CANDIDATE = "tessera/{federation}/{study}/candidate/{node}"
    AUDIT = "tessera/{federation}/{study}/audit/{node}"
    PRESENCE = "tessera/{federation}/presence/{client}"


@dataclass(frozen=True)
class Topic:
    """A parsed topic: its kind and the ids it names (None where the kind has no such id)."""

    kind: Kind
    federation: str
    study: str | None = None
    aggregator: str | None = None
    node: str | None = None
    from_aggregator: str | None = None
    client: str | None = None


def validate_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a valid opaque id, else raise TopicError saying why."""
    try:
        return check_id(what, value)
    except CodecError as error:
        raise TopicError(str(error)) from None


def validate_study(study: str) -> str:
    """A study id: a valid id other than "presence", which names the presence subtree."""
    validate_id(study, "study id")
    if study == "presence":
        raise TopicError("study id 'presence' is reserved for presence topics; choose another")
    return study


def round_topic(federation: str, study: str) -> str:
    """Round control (RoundOpen, RoundAbort), published by aggregators, read by everyone."""
    return f"{_base(federation, study)}/round"


def share_topic(federation: str, study: str, aggregator: str, node: str) -> str:
    """One node's share addressed to one aggregator."""
    validate_id(aggregator, "aggregator id")
    validate_id(node, "node id")
    return f"{_base(federation, study)}/share/{aggregator}/{node}"


def shares_for_aggregator(federation: str, study: str, aggregator: str) -> str:
    """Subscription filter for every share addressed to ``aggregator``."""
    validate_id(aggregator, "aggregator id")
    return f"{_base(federation, study)}/share/{aggregator}/+"


def received_topic(federation: str, study: str, aggregator: str) -> str:
    """An aggregator's signed set of nodes whose shares it holds."""
    validate_id(aggregator, "aggregator id")
    return f"{_base(federation, study)}/received/{aggregator}"


def receipts_topic(federation: str, study: str, aggregator: str) -> str:
    """An aggregator's signed receipts: the statement commitments of the shares it holds,
    which each site checks for its own (no node ids, so no site learns who else sent)."""
    validate_id(aggregator, "aggregator id")
    return f"{_base(federation, study)}/receipts/{aggregator}"


def all_receipts(federation: str, study: str) -> str:
    """Filter for every aggregator's receipts (what a node subscribes to)."""
    return f"{_base(federation, study)}/receipts/+"


def participants_topic(federation: str, study: str) -> str:
    """The leader's agreed participant set."""
    return f"{_base(federation, study)}/participants"


def partial_topic(federation: str, study: str, to_aggregator: str, from_aggregator: str) -> str:
    """A partial sum sealed from one aggregator to another."""
    validate_id(to_aggregator, "aggregator id")
    validate_id(from_aggregator, "aggregator id")
    return f"{_base(federation, study)}/partial/{to_aggregator}/{from_aggregator}"


def partials_for_aggregator(federation: str, study: str, aggregator: str) -> str:
    """Subscription filter for every partial sum addressed to ``aggregator``."""
    validate_id(aggregator, "aggregator id")
    return f"{_base(federation, study)}/partial/{aggregator}/+"


def release_topic(federation: str, study: str) -> str:
    """Jointly signed model releases."""
    return f"{_base(federation, study)}/release"


def fetch_topic(federation: str, study: str, node: str) -> str:
    """A node's request for a release it holds damaged (that site writes)."""
    validate_id(node, "node id")
    return f"{_base(federation, study)}/fetch/{node}"


def fetch_requests(federation: str, study: str) -> str:
    """Filter for every node's release requests (what an aggregator subscribes to)."""
    return f"{_base(federation, study)}/fetch/+"


def release_copy_topic(federation: str, study: str, node: str) -> str:
    """A release sent again to the one node that asked for it: aggregators write, the ACL
    lets only that site read."""
    validate_id(node, "node id")
    return f"{_base(federation, study)}/release/{node}"


def candidate_topic(federation: str, study: str, node: str) -> str:
    """The candidate model `node` audits before a release: the leader writes one copy per
    participant, and the ACL lets each site read only its own, so a held model never
    reaches a site that did not train it."""
    validate_id(node, "node id")
    return f"{_base(federation, study)}/candidate/{node}"


def audit_topic(federation: str, study: str, node: str) -> str:
    """A site's signed privacy-audit report of a candidate (that site writes)."""
    validate_id(node, "node id")
    return f"{_base(federation, study)}/audit/{node}"


def audit_reports(federation: str, study: str) -> str:
    """Filter for every site's audit reports (what an aggregator subscribes to)."""
    return f"{_base(federation, study)}/audit/+"


def presence_topic(federation: str, client: str) -> str:
    """A client's retained presence ("online", or "offline" as its last will)."""
    validate_id(federation, "federation id")
    validate_id(client, "client id")
    return f"{ROOT}/{federation}/presence/{client}"


def parse(topic: str) -> Topic:
    """Parse a concrete topic (no wildcards) into a Topic; raise TopicError if it is not one."""
    parts = topic.split("/") if isinstance(topic, str) else []
    if len(parts) < 3 or parts[0] != ROOT:
        raise TopicError(f"topic {topic!r} is not in the Tessera schema (must start {ROOT}/)")
    try:
        federation = validate_id(parts[1], "federation id")
        if parts[2] == "presence" and len(parts) == 4:
            return Topic(Kind.PRESENCE, federation, client=validate_id(parts[3], "client id"))
        study = validate_study(parts[2])
        rest = parts[3:]
        return _parse_study_topic(federation, study, rest)
    except TopicError as error:
        raise TopicError(f"topic {topic!r} is not in the Tessera schema: {error}") from None


def _parse_study_topic(federation: str, study: str, rest: list[str]) -> Topic:
    simple = {
        "round": Kind.ROUND,
        "participants": Kind.PARTICIPANTS,
        "release": Kind.RELEASE,
    }
    if len(rest) == 1 and rest[0] in simple:
        return Topic(simple[rest[0]], federation, study)
    if len(rest) == 2 and rest[0] in ("received", "receipts"):
        kind = Kind.RECEIVED if rest[0] == "received" else Kind.RECEIPTS
        return Topic(kind, federation, study, aggregator=validate_id(rest[1]))
    per_node = {"audit": Kind.AUDIT, "candidate": Kind.CANDIDATE, "fetch": Kind.FETCH,
                "release": Kind.RELEASE_COPY}  # fmt: skip
    if len(rest) == 2 and rest[0] in per_node:
        return Topic(per_node[rest[0]], federation, study, node=validate_id(rest[1]))
    if len(rest) == 3 and rest[0] == "share":
        return Topic(
            Kind.SHARE,
            federation,
            study,
            aggregator=validate_id(rest[1]),
            node=validate_id(rest[2]),
        )
    if len(rest) == 3 and rest[0] == "partial":
        return Topic(
            Kind.PARTIAL,
            federation,
            study,
            aggregator=validate_id(rest[1]),
            from_aggregator=validate_id(rest[2]),
        )
    raise TopicError(f"unknown topic kind {'/'.join(rest)!r}")


def member_writer(topic: str) -> str | None:
    """The one member whose messages `topic` carries, where members write it: a site's
    shares, audit reports and release requests, a client's presence (the ACL lets no one
    else write there); None for a topic of the schema that only aggregators write, and the
    topic itself for one outside the schema."""
    try:
        parsed = parse(topic)
    except TopicError:
        return topic
    if parsed.kind in (Kind.SHARE, Kind.AUDIT, Kind.FETCH):
        return parsed.node
    if parsed.kind is Kind.PRESENCE:
        return parsed.client
    return None


def writer_key(topic: str) -> str:
    """Whom a message on `topic` is charged to: the one writer the topic names (node,
    client, aggregator, sending aggregator), else the topic itself (round and release,
    which every aggregator may write; participants and candidates, the leader's; release
    copies, which any aggregator may send)."""
    try:
        parsed = parse(topic)
    except TopicError:
        return topic
    named = {
        Kind.SHARE: parsed.node,
        Kind.AUDIT: parsed.node,
        Kind.FETCH: parsed.node,
        Kind.PRESENCE: parsed.client,
        Kind.RECEIVED: parsed.aggregator,
        Kind.PARTIAL: parsed.from_aggregator,
    }.get(parsed.kind)
    return topic if named is None else named


def validate_publish_topic(topic: str) -> str:
    """A topic one may publish to: non-empty UTF-8, no wildcards, no NUL, at most 65535 bytes."""
    if not isinstance(topic, str) or not topic:
        raise TopicError(f"publish topic {topic!r} is empty; give a concrete topic")
    if "+" in topic or "#" in topic or "\0" in topic or len(topic.encode()) > 65535:
        raise TopicError(f"publish topic {topic!r} has a wildcard, a NUL or is too long")
    return topic


def validate_filter(topic_filter: str) -> str:
    """A subscription filter: '#' only as the whole last level, '+' only as a whole level."""
    if not isinstance(topic_filter, str) or not topic_filter or "\0" in topic_filter:
        raise TopicError(f"topic filter {topic_filter!r} is empty or has a NUL")
    levels = topic_filter.split("/")
    for position, level in enumerate(levels):
        if "#" in level and (level != "#" or position != len(levels) - 1):
            raise TopicError(f"topic filter {topic_filter!r}: '#' must be the whole last level")
        if "+" in level and level != "+":
            raise TopicError(f"topic filter {topic_filter!r}: '+' must be a whole level")
    return topic_filter


def _base(federation: str, study: str) -> str:
    validate_id(federation, "federation id")
    validate_study(study)
    return f"{ROOT}/{federation}/{study}"
