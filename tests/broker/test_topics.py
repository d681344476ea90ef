"""The topic schema: builders, parsing, and validation of ids and filters."""

import pytest

from broker import topics
from broker.errors import TopicError
from broker.topics import Kind, Topic


@pytest.mark.parametrize(
    ("built", "parsed"),
    [
        (topics.round_topic("f", "s"), Topic(Kind.ROUND, "f", "s")),
        (
            topics.share_topic("f", "s", "agg-1", "site-a"),
            Topic(Kind.SHARE, "f", "s", aggregator="agg-1", node="site-a"),
        ),
        (
            topics.received_topic("f", "s", "agg-1"),
            Topic(Kind.RECEIVED, "f", "s", aggregator="agg-1"),
        ),
        (
            topics.receipts_topic("f", "s", "agg-1"),
            Topic(Kind.RECEIPTS, "f", "s", aggregator="agg-1"),
        ),
        (topics.participants_topic("f", "s"), Topic(Kind.PARTICIPANTS, "f", "s")),
        (
            topics.partial_topic("f", "s", "agg-2", "agg-1"),
            Topic(Kind.PARTIAL, "f", "s", aggregator="agg-2", from_aggregator="agg-1"),
        ),
        (topics.release_topic("f", "s"), Topic(Kind.RELEASE, "f", "s")),
        (topics.fetch_topic("f", "s", "site-a"), Topic(Kind.FETCH, "f", "s", node="site-a")),
        (
            topics.release_copy_topic("f", "s", "site-a"),
            Topic(Kind.RELEASE_COPY, "f", "s", node="site-a"),
        ),
        (topics.presence_topic("f", "site-a"), Topic(Kind.PRESENCE, "f", client="site-a")),
    ],
)
def test_every_builder_parses_back(built: str, parsed: Topic) -> None:
    assert topics.parse(built) == parsed
    # The built topic is the template with the parsed ids filled in.
    fields = {
        "federation": parsed.federation,
        "study": parsed.study,
        "aggregator": parsed.aggregator,
        "node": parsed.node,
        "to_aggregator": parsed.aggregator,
        "from_aggregator": parsed.from_aggregator,
        "client": parsed.client,
    }
    assert parsed.kind.value.format(**fields) == built


@pytest.mark.parametrize(
    "bad_id",
    ["", "a/b", "+", "#", "a+", "x#", "$SYS", "-lead", "_lead", "a b", "é", "a" * 65, "a\0b"],
)
def test_bad_ids_are_refused_everywhere(bad_id: str) -> None:
    with pytest.raises(TopicError, match="not a valid id"):
        topics.validate_id(bad_id)
    with pytest.raises(TopicError):
        topics.share_topic("f", "s", "agg-1", bad_id)
    with pytest.raises(TopicError):
        topics.round_topic(bad_id, "s")


def test_longest_valid_id_is_accepted() -> None:
    assert topics.validate_id("a" * 64) == "a" * 64


def test_presence_is_not_a_study_id() -> None:
    with pytest.raises(TopicError, match="reserved"):
        topics.round_topic("f", "presence")


@pytest.mark.parametrize(
    "topic",
    [
        "other/f/s/round",
        "tessera/f/s/round/extra",
        "tessera/f/s/unknown",
        "tessera/f/s/share/agg-1",
        "tessera/f/s/share/+/site-a",
        "tessera/f/presence",
        "tessera/f/s/partial/a",
        "tessera",
    ],
)
def test_parse_refuses_topics_outside_the_schema(topic: str) -> None:
    with pytest.raises(TopicError, match="not in the Tessera schema"):
        topics.parse(topic)


def test_subscription_filters_match_the_topics_they_name() -> None:
    import paho.mqtt.client as mqtt

    share = topics.share_topic("f", "s", "agg-1", "site-a")
    assert mqtt.topic_matches_sub(topics.shares_for_aggregator("f", "s", "agg-1"), share)
    assert not mqtt.topic_matches_sub(topics.shares_for_aggregator("f", "s", "agg-2"), share)
    partial = topics.partial_topic("f", "s", "agg-2", "agg-1")
    assert mqtt.topic_matches_sub(topics.partials_for_aggregator("f", "s", "agg-2"), partial)


@pytest.mark.parametrize("good", ["a/b", "a/+/c", "a/#", "#", "+"])
def test_valid_filters(good: str) -> None:
    assert topics.validate_filter(good) == good


@pytest.mark.parametrize("bad", ["", "a/b#", "a/#/c", "a+/b", "a/b+", "a\0"])
def test_invalid_filters(bad: str) -> None:
    with pytest.raises(TopicError):
        topics.validate_filter(bad)


@pytest.mark.parametrize("bad", ["", "a/+", "a/#", "a\0b"])
def test_publish_topics_have_no_wildcards(bad: str) -> None:
    with pytest.raises(TopicError):
        topics.validate_publish_topic(bad)


@pytest.mark.parametrize(
    ("topic", "member", "charged_to"),
    [
        (topics.share_topic("f", "s", "agg-1", "site-a"), "site-a", "site-a"),
        (topics.audit_topic("f", "s", "site-b"), "site-b", "site-b"),
        (topics.presence_topic("f", "site-c"), "site-c", "site-c"),
        (topics.received_topic("f", "s", "agg-2"), None, "agg-2"),
        (topics.partial_topic("f", "s", "agg-1", "agg-2"), None, "agg-2"),
        (topics.round_topic("f", "s"), None, "tessera/f/s/round"),
        (topics.release_topic("f", "s"), None, "tessera/f/s/release"),
        (topics.candidate_topic("f", "s", "site-a"), None, "tessera/f/s/candidate/site-a"),
        (topics.receipts_topic("f", "s", "agg-1"), None, "tessera/f/s/receipts/agg-1"),
        (topics.fetch_topic("f", "s", "site-a"), "site-a", "site-a"),
        (topics.release_copy_topic("f", "s", "site-a"), None, "tessera/f/s/release/site-a"),
        ("tessera/f/s/unknown", "tessera/f/s/unknown", "tessera/f/s/unknown"),
    ],
)
def test_the_writer_a_topic_names(topic: str, member: str | None, charged_to: str) -> None:
    # The ACL lets only that member write a share, audit, fetch or presence topic: the topic is
    # proof of the sender, so the intake gate and the transfer quotas key on it.
    assert topics.member_writer(topic) == member
    assert topics.writer_key(topic) == charged_to
