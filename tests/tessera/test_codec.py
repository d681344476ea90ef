"""The wire codec: round trips of every message, strict parsing, and fuzzing.

The fuzz tests assert the codec's one promise about bad input: it raises CodecError and
nothing else. Mutations of valid messages may also parse (a flipped bit in a round number
is a different, valid message); then the result must re-encode to exactly the mutated
bytes, which shows that no two byte strings decode to the same message.
"""

from __future__ import annotations

import dataclasses
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wire_examples import (
    any_message,
    example_release,
    example_round_open,
    model_releases,
    partial_sums,
    participant_sets,
    receipt_sets,
    received_sets,
    round_aborts,
    round_opens,
    share_envelopes,
    small_ring,
)

from tessera.errors import CodecError
from tessera.wire.agreement import PartialSum, ParticipantSet, ReceiptSet, ReceivedSet
from tessera.wire.codec import MAGIC, VERSION, MessageType
from tessera.wire.envelopes import Message, decode_message
from tessera.wire.messages import ReleaseRequest, RoundAbort, RoundOpen, ShareEnvelope
from tessera.wire.release import ModelRelease

CLASSES = [RoundOpen, ShareEnvelope, ReceivedSet, ParticipantSet, PartialSum, ModelRelease]
CLASSES.extend((RoundAbort, ReleaseRequest, ReceiptSet))
LIMIT = 1 << 20


def _round_trip(message: Message) -> None:
    data = message.to_bytes()
    assert type(message).from_bytes(data) == message
    assert decode_message(data, LIMIT) == message
    assert decode_message(data, LIMIT).to_bytes() == data


@given(round_opens())
def test_round_open_round_trips(message: RoundOpen) -> None:
    _round_trip(message)


@given(share_envelopes())
def test_share_envelope_round_trips(message: ShareEnvelope) -> None:
    _round_trip(message)


@given(received_sets())
def test_received_set_round_trips(message: ReceivedSet) -> None:
    _round_trip(message)


@given(receipt_sets)
def test_receipt_set_round_trips(message: ReceiptSet) -> None:
    _round_trip(message)


def test_a_receipt_set_is_sorted_unique_and_refuses_unsorted_bytes() -> None:
    a, b = b"a" * 32, b"b" * 32
    message = ReceiptSet("fed-1", "study-1", 1, "agg-1", (b, a, b))
    assert message.commitments == (a, b) and message.holds(a) and not message.holds(b"c" * 32)
    data = message.to_bytes()
    assert ReceiptSet.from_bytes(data) == message
    with pytest.raises(CodecError, match="strictly sorted"):
        ReceiptSet.from_bytes(data.replace(a + b, b + a))
    with pytest.raises(CodecError):
        ReceiptSet("fed-1", "study-1", 1, "agg-1", (b"short",))


@given(participant_sets)
def test_participant_set_round_trips(message: ParticipantSet) -> None:
    _round_trip(message)


@given(partial_sums)
def test_partial_sum_round_trips(message: PartialSum) -> None:
    _round_trip(message)


@given(model_releases())
def test_model_release_round_trips(message: ModelRelease) -> None:
    _round_trip(message)


@given(round_aborts)
def test_round_abort_round_trips(message: RoundAbort) -> None:
    _round_trip(message)


def test_release_request_round_trips() -> None:
    _round_trip(ReleaseRequest("fed-1", "study-1", 3, "site-a", 2))
    with pytest.raises(CodecError):
        ReleaseRequest("fed-1", "study-1", 3, "site/a", 2)  # not an id: never a topic level


def test_messages_start_with_magic_version_and_their_type() -> None:
    data = example_round_open().to_bytes()
    assert data[:6] == MAGIC + bytes((VERSION, MessageType.ROUND_OPEN))


def test_unknown_version_type_and_magic_are_refused() -> None:
    data = bytearray(example_round_open().to_bytes())
    with pytest.raises(CodecError, match="version 2 is not supported"):
        decode_message(bytes(data[:4] + b"\x02" + data[5:]), LIMIT)
    with pytest.raises(CodecError, match="type 99 is unknown"):
        decode_message(bytes(data[:5] + b"\x63" + data[6:]), LIMIT)
    with pytest.raises(CodecError, match="bad magic"):
        decode_message(b"XXXX" + bytes(data[4:]), LIMIT)
    with pytest.raises(CodecError, match="expected 1"):
        RoundOpen.from_bytes(bytes(data[:5] + b"\x02" + data[6:]))


def test_sets_are_kept_sorted_and_unsorted_wire_sets_are_refused() -> None:
    hashes = (b"c" * 32, b"a" * 32, b"b" * 32)  # each beside its node, wherever it goes
    message = ReceivedSet("fed-1", "study-1", 1, "agg-1", ("node-c", "node-a", "node-b"), hashes)
    assert message.node_ids == ("node-a", "node-b", "node-c")
    assert message.statement_hashes == (b"a" * 32, b"b" * 32, b"c" * 32)
    assert ReceivedSet.from_bytes(message.to_bytes()) == message
    data = message.to_bytes()
    swapped = data.replace(b"node-a", b"node-x")  # now "node-x" precedes "node-b"
    with pytest.raises(CodecError, match="strictly sorted"):
        ReceivedSet.from_bytes(swapped)
    with pytest.raises(CodecError, match="twice"):
        ParticipantSet("fed-1", "study-1", 1, "agg-1", ("node-a", "node-a"))


def test_participant_set_digest_names_the_set() -> None:
    one = ParticipantSet("fed-1", "study-1", 1, "agg-1", ("node-b", "node-a"))
    same = ParticipantSet("fed-1", "study-1", 1, "agg-1", ("node-a", "node-b"))
    other = ParticipantSet("fed-1", "study-1", 1, "agg-1", ("node-a",))
    assert one.digest() == same.digest() != other.digest()


def test_share_size_is_bounded_by_vector_length() -> None:
    limit = ShareEnvelope.sealed_limit(small_ring(), 4)
    fields = dict(
        federation_id="fed-1",
        study_id="study-1",
        round=1,
        base_model_hash=b"\x00" * 32,
        node_id="node-a",
        aggregator_id="agg-1",
        ring=small_ring(),
        vector_length=4,
        sealed_statement=b"",
    )
    ShareEnvelope(**fields, sealed=b"\x00" * limit)  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="at most"):
        ShareEnvelope(**fields, sealed=b"\x00" * (limit + 1))  # type: ignore[arg-type]
    # On the wire: a declared sealed length one over the bound is refused before reading.
    data = ShareEnvelope(**fields, sealed=b"\x00" * limit).to_bytes()  # type: ignore[arg-type]
    at = len(data) - 8 - limit - 8  # the sealed length, before the sealed bytes and statement
    assert struct.unpack(">Q", data[at : at + 8])[0] == limit
    oversized = data[:at] + struct.pack(">Q", limit + 1) + b"\x00" * (limit + 1) + data[-8:]
    with pytest.raises(CodecError, match="over its limit"):
        ShareEnvelope.from_bytes(oversized)


def test_a_share_envelope_carries_its_statement_sealed_and_bounded() -> None:
    fields = dict(
        federation_id="fed", study_id="study", round=1, base_model_hash=b"\x00" * 32,
        node_id="node-a", aggregator_id="agg-1", ring=small_ring(), vector_length=4,
        sealed=b"\x00" * 8,
    )  # fmt: skip
    good = ShareEnvelope(**fields, sealed_statement=b"s" * 94)  # type: ignore[arg-type]
    assert ShareEnvelope.from_bytes(good.to_bytes()).sealed_statement == b"s" * 94
    assert not [f for f in dataclasses.fields(ShareEnvelope) if "epsilon" in f.name]
    with pytest.raises(CodecError, match="sealed statement"):
        ShareEnvelope(**fields, sealed_statement=b"s" * 257)  # type: ignore[arg-type]
    forged = good.to_bytes()[: -8 - 94] + struct.pack(">Q", 257) + b"s" * 257
    with pytest.raises(CodecError, match="over its limit"):
        ShareEnvelope.from_bytes(forged)


def test_a_received_set_has_one_statement_hash_per_node() -> None:
    with pytest.raises(CodecError, match="one statement hash per node"):
        ReceivedSet("fed", "study", 1, "agg-1", ("node-a", "node-b"), (b"a" * 32,))
    with pytest.raises(CodecError, match="32-byte"):
        ReceivedSet("fed", "study", 1, "agg-1", ("node-a",), (b"a" * 31,))
    data = ReceivedSet("fed", "study", 1, "agg-1", ("node-a",), (b"a" * 32,)).to_bytes()
    with pytest.raises(CodecError):
        ReceivedSet.from_bytes(data[:-1])


def test_huge_declared_lengths_fail_fast() -> None:
    release = example_release()
    data = release.to_bytes()
    assert len(data) - 174 == 154  # offsets the messages below name
    payload_length_at = data.index(struct.pack(">Q", len(release.payload)))
    forged = data[:payload_length_at] + struct.pack(">Q", 2**63) + data[payload_length_at + 8 :]
    with pytest.raises(CodecError, match="only 154 remain"):
        ModelRelease.from_bytes(forged, max_payload=2**64)
    with pytest.raises(CodecError, match="over its limit"):
        ModelRelease.from_bytes(data, max_payload=len(release.payload) - 1)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("learning_rate", float("nan")),
        ("clip_norm", float("inf")),
        ("prox_mu", -1.0),
        ("algorithm", "fedprox"),
        ("leader_id", "agg-9"),
        ("aggregator_ids", ("agg-1",)),
        ("aggregator_ids", ("agg-1", "agg-1")),
        ("base_model_hash", "ab" * 32),
        ("round", -1),
        ("round", 2**64),
        ("vector_length", 0),
        ("min_participants", 0),
        ("federation_id", "fed/1"),
        ("study_id", ""),
        ("expected_nodes", ["node-a"]),
        ("opened_ms", 1_800_000_000_001),  # after its own deadline
    ],
)
def test_invalid_round_open_fields_are_refused(field: str, value: object) -> None:
    with pytest.raises(CodecError):
        dataclasses.replace(example_round_open(), **{field: value})


def test_non_finite_float_on_the_wire_is_refused() -> None:
    data = example_round_open().to_bytes()
    rate = struct.pack(">d", 0.01)
    assert data.count(rate) == 1
    with pytest.raises(CodecError, match="not finite"):
        RoundOpen.from_bytes(data.replace(rate, struct.pack(">d", float("nan"))))


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_codec_error(data: bytes) -> None:
    for parse in (decode_message, *(_parser(cls) for cls in CLASSES)):
        try:
            parse(data, LIMIT)
        except CodecError:
            pass


@settings(max_examples=300)
@given(st.sampled_from(list(MessageType)), st.binary(max_size=200))
def test_valid_header_with_arbitrary_body_raises_only_codec_error(
    message_type: MessageType, body: bytes
) -> None:
    data = MAGIC + bytes((VERSION, message_type)) + body
    try:
        message = decode_message(data, LIMIT)
    except CodecError:
        return
    assert message.to_bytes() == data


@st.composite
def mutations(draw: st.DrawFn) -> tuple[bytes, bytes]:
    original = draw(any_message).to_bytes()
    kind = draw(st.sampled_from(["truncate", "append", "flip", "overwrite", "insert"]))
    data = bytearray(original)
    if kind == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "append":
        data += draw(st.binary(min_size=1, max_size=16))
    elif kind == "flip":
        bit = draw(st.integers(0, len(data) * 8 - 1))
        data[bit // 8] ^= 1 << (bit % 8)
    elif kind == "overwrite":
        # Aimed at length fields: replace 1 to 8 bytes with extreme values.
        at = draw(st.integers(0, len(data) - 1))
        patch = draw(st.sampled_from([b"\xff" * 8, b"\x00" * 8, b"\x7f\xff", b"\x00\x01"]))
        data[at : at + len(patch)] = patch[: len(data) - at]
    else:
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=8))
    return original, bytes(data)


@settings(max_examples=800, suppress_health_check=[HealthCheck.too_slow])
@given(mutations())
def test_mutated_messages_are_refused_or_reencode_exactly(case: tuple[bytes, bytes]) -> None:
    _, mutated = case
    try:
        message = decode_message(mutated, LIMIT)
    except CodecError:
        return
    assert message.to_bytes() == mutated


def test_every_truncation_of_every_example_is_refused() -> None:
    examples: list[Message] = [example_round_open(), example_release()]
    examples.append(
        ReceivedSet("fed-1", "study-1", 1, "agg-1", ("node-a", "node-b"), (b"a" * 32, b"b" * 32))
    )
    examples.append(RoundAbort("fed-1", "study-1", 1, "agg-1", "only 1 of 2 participants"))
    examples.append(ReleaseRequest("fed-1", "study-1", 1, "site-a", 1))
    for message in examples:
        data = message.to_bytes()
        for cut in range(len(data)):
            with pytest.raises(CodecError):
                decode_message(data[:cut], LIMIT)
        with pytest.raises(CodecError, match="unexpected bytes"):
            decode_message(data + b"\x00", LIMIT)


def _parser(cls: type) -> object:
    def parse(data: bytes, limit: int) -> object:
        return cls.from_bytes(data)

    return parse


def test_round_abort_reason_is_limited_utf8() -> None:
    assert RoundAbort("f", "s", 1, "a", "fewer than k: 1 < 2 ✓").to_bytes()
    with pytest.raises(CodecError, match="at most"):
        RoundAbort("f", "s", 1, "a", "x" * 1025)
    with pytest.raises(CodecError):
        RoundAbort("f", "s", 1, "a", "\ud800")  # a lone surrogate has no UTF-8 form


def test_odd_inputs_are_codec_errors_not_crashes() -> None:
    with pytest.raises(CodecError, match="too large"):
        dataclasses.replace(example_round_open(), learning_rate=10**400)
    with pytest.raises(CodecError, match="contiguous"):
        decode_message(memoryview(example_round_open().to_bytes())[::2], LIMIT)  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="expected bytes"):
        decode_message("TSRM", LIMIT)  # type: ignore[arg-type]
