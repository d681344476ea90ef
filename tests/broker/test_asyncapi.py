"""broker/asyncapi.yaml cannot drift from the code.

The test reads the document the way a second implementation would: it parses real bytes
produced by tessera's codec, the envelope signer and the chunker using only the layouts the
document gives, and compares every field with the objects that produced them. It also
checks channels against broker.topics and message type ids against tessera.wire.codec.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from broker import topics
from broker.chunking import split_payload
from tessera.crypto.encoding import RingParams, derive_ring_params
from tessera.crypto.signing import generate_signing_key
from tessera.wire.agreement import PartialSum, ParticipantSet, ReceiptSet, ReceivedSet
from tessera.wire.codec import MessageType
from tessera.wire.envelopes import seal_envelope
from tessera.wire.messages import ReleaseRequest, RoundAbort, RoundOpen, ShareEnvelope
from tessera.wire.release import ReleaseBundle, build_release
from tessera.wire.statement import NodeStatement

DOCUMENT = Path(__file__).parents[2] / "broker" / "asyncapi.yaml"
H = hashlib.sha256


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return yaml.safe_load(DOCUMENT.read_text())


def layout(spec: dict[str, Any], schema: str) -> list[dict[str, Any]]:
    return spec["components"]["schemas"][schema]["x-tessera-layout"]


class LayoutReader:
    """Parses bytes by a document layout, knowing only the document's encodings."""

    FIXED: ClassVar[dict[str, str]] = {
        "u8": ">B",
        "u16": ">H",
        "u32": ">I",
        "u64": ">Q",
        "f64": ">d",
    }

    def __init__(self, spec: dict[str, Any], data: bytes) -> None:
        self.spec, self.data, self.at = spec, data, 0

    def take(self, count: int) -> bytes:
        assert self.at + count <= len(self.data), "layout reads past the end"
        chunk = self.data[self.at : self.at + count]
        self.at += count
        return chunk

    def field(self, field: dict[str, Any], before: dict[str, Any] | None = None) -> Any:
        encoding = field["encoding"]
        if encoding == "hashes":  # one 32-byte hash per item of the field it names
            value = tuple(self.take(32) for _ in (before or {})[field["per"]])
        elif encoding == "hashlist":
            value = tuple(self.take(32) for _ in range(self.u(">I")))
        elif encoding in self.FIXED:
            fmt = self.FIXED[encoding]
            value = struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]
        elif encoding == "magic":
            value = self.take(len(field["value"])).decode("ascii")
        elif encoding == "hash":
            value = self.take(32)
        elif encoding.startswith("bytes"):
            value = self.take(int(encoding[5:]))
        elif encoding in ("id", "text"):
            value = self.take(self.u(">H")).decode("utf-8")
        elif encoding == "ids":
            value = tuple(self.field({"encoding": "id"}) for _ in range(self.u(">H")))
        elif encoding == "blob64":
            value = self.take(self.u(">Q"))
        elif encoding == "blob32":
            value = self.take(self.u(">I"))
        elif encoding == "ring":
            raw = self.take(self.u(">H"))
            value = parse(self.spec, "RingParams", raw, header=False)
        elif encoding == "signatures":
            value = tuple(
                (self.field({"encoding": "id"}), self.take(64)) for _ in range(self.u(">H"))
            )
        else:
            raise AssertionError(f"document uses an encoding it does not define: {encoding}")
        if "value" in field:
            assert value == field["value"], f"{field['name']} must be {field['value']!r}"
        return value

    def u(self, fmt: str) -> int:
        return int(struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0])


def parse(spec: dict[str, Any], schema: str, data: bytes, header: bool = True) -> dict[str, Any]:
    """Parse ``data`` as ``schema``; for messages, the MessageHeader first."""
    reader = LayoutReader(spec, data)
    values: dict[str, Any] = {}
    if header:
        values.update({f["name"]: reader.field(f) for f in layout(spec, "MessageHeader")})
    for f in layout(spec, schema):
        values[f["name"]] = reader.field(f, values)
    assert reader.at == len(data), f"{schema}: {len(data) - reader.at} bytes left unparsed"
    return values


def ring() -> RingParams:
    return derive_ring_params(bound=2.5, max_participants=20)


def example_messages() -> list[Any]:
    h1, h2 = H(b"1").digest(), H(b"2").digest()
    bundle = ReleaseBundle(b"weights", b"onnx-bytes", b'{"card": 1}')
    return [
        RoundOpen(
            "fed-a",
            "study.1",
            7,
            h1,
            3,
            1_700_000_000_000,
            "fedavg",
            2,
            0,
            0.01,
            0.5,
            1.5,
            ring(),
            2,
            1000,
            ("agg-1", "agg-2"),
            ("site-a", "site-b"),
            "agg-1",
            opened_ms=1_699_999_940_000,
        ),
        ShareEnvelope(
            "fed-a",
            "study.1",
            7,
            h1,
            "site-a",
            "agg-2",
            ring(),
            1000,
            os.urandom(80),
            os.urandom(94),
        ),
        ReceivedSet("fed-a", "study.1", 7, "agg-1", ("site-a", "site-b"), (h1, h2)),
        ReceiptSet("fed-a", "study.1", 7, "agg-1", (h2, h1)),
        ParticipantSet("fed-a", "study.1", 7, "agg-1", ("site-a", "site-b")),
        PartialSum("fed-a", "study.1", 7, "agg-1", "agg-2", h2, os.urandom(100)),
        build_release("fed-a", "study.1", 7, 4, h1, bundle),
        RoundAbort("fed-a", "study.1", 7, "agg-1", "fewer than k participants"),
        ReleaseRequest("fed-a", "study.1", 7, "site-a", 4),
    ]


def comparable(value: Any) -> Any:
    if isinstance(value, RingParams):
        return {
            "format_version": 1,
            "bits": value.bits,
            "frac_bits": value.frac_bits,
            "bound": value.bound,
            "max_participants": value.max_participants,
        }
    return value


@pytest.mark.parametrize("message", example_messages(), ids=lambda m: type(m).__name__)
def test_codec_bytes_parse_by_the_documented_layout(spec: dict[str, Any], message: Any) -> None:
    name = type(message).__name__
    documented = spec["components"]["messages"][name]
    assert documented["x-tessera-type"] == int(message.TYPE) == int(MessageType[_enum(name)])
    parsed = parse(spec, name, message.to_bytes())
    assert parsed["type"] == int(message.TYPE)
    fields = [f.name for f in dataclasses.fields(message)]
    assert [f["name"] for f in layout(spec, name)] == fields
    for field in fields:
        assert parsed[field] == comparable(getattr(message, field)), field


def test_release_bundle_layout(spec: dict[str, Any]) -> None:
    bundle = ReleaseBundle(b"w" * 10, b"o" * 3, b"card")
    parsed = parse(spec, "ReleaseBundle", bundle.to_bytes())
    assert parsed["type"] == spec["components"]["schemas"]["ReleaseBundle"]["x-tessera-type"]
    assert parsed["type"] == MessageType.RELEASE_BUNDLE
    assert (parsed["weights"], parsed["onnx"], parsed["card"]) == (b"w" * 10, b"o" * 3, b"card")


def test_node_statement_layout(spec: dict[str, Any]) -> None:
    statement = NodeStatement.fresh(2.75)
    schema = spec["components"]["schemas"]["NodeStatement"]
    assert schema["x-tessera-type"] == int(MessageType.NODE_STATEMENT) == int(statement.TYPE)
    parsed = parse(spec, "NodeStatement", statement.to_bytes())
    assert parsed["type"] == int(MessageType.NODE_STATEMENT)
    assert (parsed["epsilon_total"], parsed["salt"]) == (2.75, statement.salt)


def test_signed_envelope_layout(spec: dict[str, Any]) -> None:
    message = ReceivedSet("fed-a", "s", 1, "agg-1", ("site-a",), (bytes(32),))
    raw = seal_envelope(message, "agg-1", generate_signing_key())
    parsed = parse(spec, "SignedEnvelope", raw, header=False)
    assert parsed["signer"] == "agg-1" and parsed["message"] == message.to_bytes()
    assert len(parsed["signature"]) == 64


def test_chunk_frame_layout(spec: dict[str, Any]) -> None:
    payload = os.urandom(2500)
    for frame in split_payload(payload, 1000):
        parsed = parse(spec, "ChunkFrame", frame.to_bytes(), header=False)
        assert parsed["payload_id"] == frame.payload_id
        assert (parsed["index"], parsed["count"], parsed["chunk_size"]) == (frame.index, 3, 1000)
        assert parsed["total_size"] == 2500
        assert parsed["payload_sha256"] == H(payload).digest()
        assert parsed["chunk_sha256"] == H(parsed["data"]).digest()


def test_every_message_type_on_the_wire_is_documented(spec: dict[str, Any]) -> None:
    documented = {
        m["x-tessera-type"]
        for m in spec["components"]["messages"].values()
        if "x-tessera-type" in m
    }
    on_the_wire = {int(t) for t in MessageType} - {
        MessageType.RELEASE_HEADER,  # only ever signed, never sent
        MessageType.RELEASE_BUNDLE,  # documented as the ReleaseBundle schema
        MessageType.NODE_STATEMENT,  # documented as the NodeStatement schema, only ever sealed
    }
    assert documented == on_the_wire


def test_channels_are_exactly_the_topic_schema(spec: dict[str, Any]) -> None:
    channels = spec["channels"]
    assert {c["x-tessera-kind"] for c in channels.values()} == {k.name for k in topics.Kind}
    for channel in channels.values():
        kind = topics.Kind[channel["x-tessera-kind"]]
        assert channel["address"] == kind.value
        named = set(_placeholders(kind.value))
        assert set(channel["parameters"]) == named
        for parameter in named:
            assert parameter in spec["components"]["parameters"]


def test_documented_addresses_build_and_parse_like_the_code(spec: dict[str, Any]) -> None:
    ids = {
        "federation": "fed-a",
        "study": "study.1",
        "aggregator": "agg-2",
        "node": "site-a",
        "to_aggregator": "agg-2",
        "from_aggregator": "agg-1",
        "client": "site-a",
    }
    built = {
        "ROUND": topics.round_topic("fed-a", "study.1"),
        "SHARE": topics.share_topic("fed-a", "study.1", "agg-2", "site-a"),
        "RECEIVED": topics.received_topic("fed-a", "study.1", "agg-2"),
        "RECEIPTS": topics.receipts_topic("fed-a", "study.1", "agg-2"),
        "PARTICIPANTS": topics.participants_topic("fed-a", "study.1"),
        "PARTIAL": topics.partial_topic("fed-a", "study.1", "agg-2", "agg-1"),
        "RELEASE": topics.release_topic("fed-a", "study.1"),
        "FETCH": topics.fetch_topic("fed-a", "study.1", "site-a"),
        "RELEASE_COPY": topics.release_copy_topic("fed-a", "study.1", "site-a"),
        "CANDIDATE": topics.candidate_topic("fed-a", "study.1", "site-a"),
        "AUDIT": topics.audit_topic("fed-a", "study.1", "site-a"),
        "PRESENCE": topics.presence_topic("fed-a", "site-a"),
    }
    for channel in spec["channels"].values():
        address = channel["address"].format(**ids)
        assert address == built[channel["x-tessera-kind"]]
        assert topics.parse(address).kind.name == channel["x-tessera-kind"]


def test_references_resolve_and_everything_is_secured(spec: dict[str, Any]) -> None:
    assert spec["asyncapi"] == "3.0.0"

    def resolve(ref: str) -> Any:
        node: Any = spec
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        return node

    refs: list[str] = []

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            refs.extend(v for k, v in node.items() if k == "$ref")
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(spec)
    assert refs and all(resolve(ref) is not None for ref in refs)
    schemes = spec["components"]["securitySchemes"]
    assert schemes["federationMutualTls"]["type"] == "X509"
    for server in spec["servers"].values():
        assert server["protocol"] in ("secure-mqtt", "wss")
        assert server["security"] == [{"$ref": "#/components/securitySchemes/federationMutualTls"}]
    used = {m["$ref"].split("/")[-1] for op in spec["operations"].values() for m in op["messages"]}
    assert used == set(spec["components"]["messages"])
    for operation in spec["operations"].values():
        assert operation["bindings"]["mqtt"]["qos"] == 1


def _enum(class_name: str) -> str:
    return "".join("_" + c if c.isupper() else c for c in class_name).lstrip("_").upper()


def _placeholders(template: str) -> list[str]:
    import string

    return [name for _, name, _, _ in string.Formatter().parse(template) if name]
