"""The wire codec: framing and field primitives shared by every Tessera message.

Format. A message is `MAGIC ("TSRM") | version (u8) | type (u8) | body`. The body is a fixed,
per-type sequence of fields (see `tessera.wire.messages`), each one of:

- integers: unsigned, big-endian, fixed width (u8, u16, u32, u64);
- floats: IEEE 754 binary64, big-endian, finite only (so each value has one encoding);
- hashes: exactly 32 raw bytes;
- ids: u16 length, then 1 to 64 ASCII bytes of `[A-Za-z0-9._-]`, starting alphanumerically;
- text: u16 length, then UTF-8;
- blobs: u32 or u64 length, then the bytes;
- lists: u16 count, then the items.

Parsing is strict: every declared length is checked against what remains and against the
field's own limit before anything is sliced or allocated, trailing bytes are refused, and an
unknown magic, version or type is refused. Every malformed input raises `CodecError`, and
nothing else (no IndexError, struct.error, UnicodeDecodeError or OverflowError escapes).

Why this format and not protobuf, CBOR or JSON: the bytes are signed, so one value must have
exactly one encoding, and a hand-written fixed schema gives that without canonicalisation
rules (protobuf and CBOR both allow several encodings of one value; JSON has no bytes and
loose numbers). It adds no dependency to the pure core. Each message is a flat table of
fixed-order fields, simple to describe in AsyncAPI and to re-implement in another language.
And a parser that checks each length before use has a small, reviewable attack surface, which
matters because envelopes arrive from an untrusted broker.
"""

from __future__ import annotations

import itertools
import math
import struct
from enum import IntEnum

from tessera.crypto.encoding import RingParams
from tessera.errors import CodecError
from tessera.wire.ids import MAX_ID_LENGTH, check_id

# Anything the parsers accept: they read through a memoryview and never keep the original.
Bytes = bytes | bytearray | memoryview

MAGIC = b"TSRM"
VERSION = 1
HASH_LENGTH = 32
MAX_TEXT_LENGTH = 1024
MAX_LIST_COUNT = 10_000
MAX_RING_BYTES = 256


class MessageType(IntEnum):
    """The type byte after the version; never reuse a retired number."""

    ROUND_OPEN = 1
    SHARE_ENVELOPE = 2
    RECEIVED_SET = 3
    PARTICIPANT_SET = 4
    PARTIAL_SUM = 5
    MODEL_RELEASE = 6
    ROUND_ABORT = 7
    RELEASE_REQUEST = 8
    RECEIPT_SET = 9
    RELEASE_HEADER = 0x46  # only ever signed, never sent alone
    RELEASE_BUNDLE = 0x47  # only inside a ModelRelease payload
    NODE_STATEMENT = 0x48  # only inside a sealed statement of a ShareEnvelope


def check_uint(name: str, value: object, bits: int) -> int:
    """Return `value` if it is an int in 0..2**bits-1, else raise CodecError."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**bits:
        raise CodecError(f"{name} {value!r} is not an integer in 0..2**{bits}-1")
    return value


def check_hash(name: str, value: object) -> bytes:
    """Return `value` if it is 32 raw bytes, else raise CodecError."""
    if not isinstance(value, bytes) or len(value) != HASH_LENGTH:
        raise CodecError(f"{name} must be a raw 32-byte SHA-256 digest (not hex), got {value!r}")
    return value


def check_float(name: str, value: object, minimum: float = 0.0) -> float:
    """Return `value` if it is a finite float >= minimum, else raise CodecError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CodecError(f"{name} {value!r} is not a number")
    try:
        value = float(value)
    except OverflowError:
        raise CodecError(f"{name} {value!r} is too large for a float") from None
    if not math.isfinite(value) or value < minimum:
        raise CodecError(f"{name} {value!r} must be finite and at least {minimum}")
    return float(value)


def check_ids(name: str, values: object, *, unique: bool = True) -> tuple[str, ...]:
    """Return `values` as a tuple of valid ids (no duplicates by default)."""
    if not isinstance(values, tuple):
        raise CodecError(f"{name} must be a tuple of ids, got {type(values).__name__}")
    if len(values) > MAX_LIST_COUNT:
        raise CodecError(f"{name} has {len(values)} entries, more than {MAX_LIST_COUNT}")
    for value in values:
        check_id(name, value)
    if unique and len(set(values)) != len(values):
        raise CodecError(f"{name} lists an id twice: {values!r}")
    return values


class Writer:
    """Appends fields in wire order; `finish()` returns the bytes.

    The writer trusts its caller: messages validate every field on construction, so
    lengths and ranges are already within the schema when a value arrives here.
    """

    def __init__(self, message_type: int) -> None:
        self._parts: list[bytes] = [MAGIC, bytes((VERSION, message_type))]

    def u8(self, value: int) -> None:
        """One unsigned byte."""
        self._parts.append(struct.pack(">B", value))

    def u16(self, value: int) -> None:
        """Unsigned 16-bit, big-endian."""
        self._parts.append(struct.pack(">H", value))

    def u32(self, value: int) -> None:
        """Unsigned 32-bit, big-endian."""
        self._parts.append(struct.pack(">I", value))

    def u64(self, value: int) -> None:
        """Unsigned 64-bit, big-endian."""
        self._parts.append(struct.pack(">Q", value))

    def f64(self, value: float) -> None:
        """IEEE 754 binary64, big-endian."""
        self._parts.append(struct.pack(">d", value))

    def raw(self, value: bytes) -> None:
        """Bytes whose length the schema fixes (a hash, a signature) or that a prefix gave."""
        self._parts.append(value)

    def hash(self, value: bytes) -> None:
        """A 32-byte digest."""
        self._parts.append(value)

    def id(self, value: str) -> None:
        """An id: u16 length, then its ASCII bytes."""
        self.text(value)

    def text(self, value: str) -> None:
        """Text: u16 length, then UTF-8."""
        raw = value.encode("utf-8")
        self.u16(len(raw))
        self._parts.append(raw)

    def ids(self, values: tuple[str, ...]) -> None:
        """A list of ids: u16 count, then each id."""
        self.u16(len(values))
        for value in values:
            self.id(value)

    def blob64(self, value: bytes) -> None:
        """A blob: u64 length, then the bytes."""
        self.u64(len(value))
        self._parts.append(value)

    def finish(self) -> bytes:
        """The encoded message."""
        return b"".join(self._parts)


class Reader:
    """Reads fields in wire order from untrusted bytes; every failure is a CodecError."""

    def __init__(self, data: Bytes, what: str) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise CodecError(f"{what}: expected bytes, got {type(data).__name__}")
        try:
            self._view = memoryview(data).cast("B")
        except TypeError:
            raise CodecError(f"{what}: expected contiguous bytes") from None
        self._at = 0
        self._what = what

    @property
    def remaining(self) -> int:
        return len(self._view) - self._at

    def _take(self, count: int, field: str) -> memoryview:
        if count > self.remaining:
            raise CodecError(
                f"{self._what}: field {field} needs {count} bytes at offset {self._at}, "
                f"but only {self.remaining} remain (truncated or corrupt message)"
            )
        chunk = self._view[self._at : self._at + count]
        self._at += count
        return chunk

    def fixed(self, count: int, field: str) -> bytes:
        """Exactly `count` bytes, as the schema fixes them."""
        return bytes(self._take(count, field))

    def u8(self, field: str) -> int:
        """One unsigned byte."""
        return self._take(1, field)[0]

    def u16(self, field: str) -> int:
        """Unsigned 16-bit, big-endian."""
        return int.from_bytes(self._take(2, field), "big")

    def u32(self, field: str) -> int:
        """Unsigned 32-bit, big-endian."""
        return int.from_bytes(self._take(4, field), "big")

    def u64(self, field: str) -> int:
        """Unsigned 64-bit, big-endian."""
        return int.from_bytes(self._take(8, field), "big")

    def f64(self, field: str, minimum: float = 0.0) -> float:
        """A binary64 that must be finite and at least `minimum`."""
        value: float = struct.unpack(">d", self._take(8, field))[0]
        if not math.isfinite(value) or value < minimum:
            raise CodecError(f"{self._what}: field {field} is {value!r}, not finite >= {minimum}")
        return value

    def hash(self, field: str) -> bytes:
        """A 32-byte digest."""
        return bytes(self._take(HASH_LENGTH, field))

    def text(self, field: str, limit: int = MAX_TEXT_LENGTH) -> str:
        """u16-length-prefixed UTF-8 of at most `limit` bytes."""
        length = self.u16(field)
        if length > limit:
            raise CodecError(f"{self._what}: field {field} is {length} bytes, over {limit}")
        try:
            return str(self._take(length, field), "utf-8")
        except UnicodeDecodeError:
            raise CodecError(f"{self._what}: field {field} is not valid UTF-8") from None

    def id(self, field: str) -> str:
        """An id, checked against the id rule."""
        value = self.text(field, MAX_ID_LENGTH)
        return check_id(f"{self._what}: field {field}", value)

    def ids(self, field: str, limit: int = MAX_LIST_COUNT) -> tuple[str, ...]:
        """A u16-counted list of at most `limit` ids."""
        count = self.u16(field)
        if count > limit:
            raise CodecError(f"{self._what}: field {field} lists {count} ids, over {limit}")
        return tuple(self.id(field) for _ in range(count))

    def blob64(self, field: str, limit: int) -> bytes:
        """A u64-length-prefixed blob; its declared length is checked against `limit` and
        against what remains before anything is copied."""
        return bytes(self.blob64_view(field, limit))

    def blob64_view(self, field: str, limit: int) -> memoryview:
        """`blob64` without the copy: a view into the input, valid while the input is."""
        length = self.u64(field)
        if length > limit:
            raise CodecError(
                f"{self._what}: field {field} declares {length} bytes, over its limit {limit}"
            )
        return self._take(length, field)

    def done(self) -> None:
        """Refuse trailing bytes: a message ends exactly where its schema does."""
        if self.remaining:
            raise CodecError(
                f"{self._what}: {self.remaining} unexpected bytes after the last field"
            )


def read_frame(data: Bytes, what: str) -> tuple[int, Reader]:
    """Check magic and version; return the message type and a reader at the body."""
    reader = Reader(data, what)
    magic = reader.fixed(len(MAGIC), "magic")
    if magic != MAGIC:
        raise CodecError(f"{what}: bad magic {magic!r}, expected {MAGIC!r}; not a Tessera message")
    version = reader.u8("version")
    if version != VERSION:
        raise CodecError(
            f"{what}: wire version {version} is not supported (this build speaks {VERSION}); "
            "upgrade the older side"
        )
    return reader.u8("type"), reader


def begin(data: Bytes, what: str, expected: MessageType) -> Reader:
    """Check the frame and that the type byte is `expected`; return a reader at the body."""
    message_type, reader = read_frame(data, what)
    if message_type != expected:
        raise CodecError(f"{what}: type byte is {message_type}, expected {int(expected)}")
    return reader


def check_context(federation_id: object, study_id: object, round_: object) -> None:
    """Validate the (federation, study, round) triple that every message starts with."""
    check_id("federation_id", federation_id)
    check_id("study_id", study_id)
    check_uint("round", round_, 64)


def write_context(writer: Writer, federation_id: str, study_id: str, round_: int) -> None:
    """Write the (federation, study, round) triple."""
    writer.id(federation_id)
    writer.id(study_id)
    writer.u64(round_)


def read_context(reader: Reader) -> tuple[str, str, int]:
    """Read the (federation, study, round) triple."""
    return reader.id("federation_id"), reader.id("study_id"), reader.u64("round")


def check_ring(ring: object) -> RingParams:
    """Return `ring` if it is a RingParams, else raise CodecError."""
    if not isinstance(ring, RingParams):
        raise CodecError(f"ring must be RingParams, got {type(ring).__name__}")
    return ring


def write_ring(writer: Writer, ring: RingParams) -> None:
    """Write RingParams as a u16-length-prefixed field of its own fixed layout."""
    raw = ring.to_bytes()
    writer.u16(len(raw))
    writer.raw(raw)


def read_ring(reader: Reader) -> RingParams:
    """Read RingParams; any fault in its bytes is a CodecError."""
    length = reader.u16("ring length")
    if length > MAX_RING_BYTES:
        raise CodecError(f"ring parameters declare {length} bytes, over {MAX_RING_BYTES}")
    raw = reader.fixed(length, "ring")
    try:
        return RingParams.from_bytes(raw)
    except CodecError:
        raise
    except (ValueError, TypeError, OverflowError) as error:
        raise CodecError(f"ring parameters are malformed: {error}") from None


def sorted_ids(name: str, values: object) -> tuple[str, ...]:
    """Validate a set of ids and return it sorted: one set, one encoding."""
    if isinstance(values, (list, set, frozenset)):
        values = tuple(values)
    return tuple(sorted(check_ids(name, values)))


def read_sorted_ids(reader: Reader, field: str) -> tuple[str, ...]:
    """Read an id list that must be strictly increasing (sorted, no duplicates)."""
    ids = reader.ids(field, MAX_LIST_COUNT)
    if any(a >= b for a, b in itertools.pairwise(ids)):
        raise CodecError(f"{field} must be strictly sorted (unique) on the wire")
    return ids
