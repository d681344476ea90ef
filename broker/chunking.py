"""Chunk frames and their reassembly: pure, no paho; the clock is injected.

Every payload crosses the wire as one or more chunk frames (a small payload is one frame),
so the receiver checks one SHA-256 per chunk and one over the whole payload, always.
Frame layout (big-endian, 109-byte header then the chunk bytes)::

    magic      4   b"TSCK"
    version    1   1
    payload_id 16  random per payload (os.urandom)
    index      4   0-based chunk index
    count      4   number of chunks, >= 1
    chunk_size 4   bytes in every chunk but the last (offset = index * chunk_size)
    total_size 8   bytes in the whole payload
    payload_sha256 32
    chunk_sha256   32  over this chunk's bytes
    chunk_len  4   bytes that follow
    data       chunk_len

Reassembly charges each open transfer to its origin (`broker.quotas.Origin`: the sender the
topic names, and its pool) and keeps, per pool, at most ``max_transfers`` open transfers and
``max_total_bytes`` of declared payload, and per sender at most ``sender_transfers`` and
``sender_bytes``; `broker.quotas.make_room` says which open transfers a new one displaces
(the sender's own stalest first) or refuses it. So one member's stalled or oversized
transfers never block another member's, nor the aggregators' own messages (issue 20, point
5). A transfer larger than ``spool_threshold`` is spooled to an anonymous temporary file in
``spool_dir`` instead of memory. A repeated identical chunk is ignored (QoS 1 may deliver
twice); a chunk that conflicts with one already held is rejected; a transfer with no
progress for ``timeout_s`` is dropped and recorded in ``expired``.

Spooling fails loudly and loses nothing. A spool folder that is missing or not writable is
refused when the Reassembler is made (`check_spool_dir`; services make theirs with
`prepare_spool_dir`). A chunk that cannot be spooled later (the folder vanished, the disk
is full) raises SpoolError, a DeliveryDeferred: the chunk is not counted as received, the
transfer keeps what it holds and does not expire while its chunks are being retried, and
the session leaves the chunk unacknowledged and offers it again (`broker.session`), so the
broker, which acknowledged it to the sender, still holds it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import tempfile
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from broker.errors import ChunkError, PayloadTooLargeError, SpoolError
from broker.quotas import Holding, Origin, QuotaLimits, make_room
from tessera.errors import ConfigError
from tessera.files import make_private_dir
from tessera.limits import MAX_TRANSFER_BYTES, MAX_TRANSFERS_IN_FLIGHT_BYTES, SPOOL_THRESHOLD_BYTES
from tessera.observability.events import Event

MAGIC = b"TSCK"
VERSION = 1
_HEADER = struct.Struct(">4sB16sIIIQ32s32sI")
HEADER_SIZE = _HEADER.size
PAYLOAD_ID_SIZE = 16
DEFAULT_CHUNK_SIZE = 1 << 20
# A transfer idle this long (while connected) is dropped: well inside a round's collection
# window, so a stalled transfer cannot hold its place for a whole round.
DEFAULT_TRANSFER_TIMEOUT_S = 120.0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkFrame:
    """One chunk of one payload, as it travels in one MQTT message."""

    payload_id: bytes
    index: int
    count: int
    chunk_size: int
    total_size: int
    payload_sha256: bytes
    chunk_sha256: bytes
    data: bytes | memoryview

    def to_bytes(self) -> bytes:
        """Encode the frame (header then data)."""
        header = _HEADER.pack(
            MAGIC,
            VERSION,
            self.payload_id,
            self.index,
            self.count,
            self.chunk_size,
            self.total_size,
            self.payload_sha256,
            self.chunk_sha256,
            len(self.data),
        )
        return b"".join((header, self.data))

    @classmethod
    def from_bytes(cls, raw: bytes | memoryview) -> ChunkFrame:
        """Decode and check one frame: lengths, geometry and the chunk's own SHA-256."""
        if len(raw) < HEADER_SIZE:
            raise ChunkError(f"chunk frame of {len(raw)} bytes is shorter than its header")
        magic, version, pid, index, count, chunk_size, total, psha, csha, clen = (
            _HEADER.unpack_from(raw)
        )
        if magic != MAGIC or version != VERSION:
            raise ChunkError(
                f"not a chunk frame of version {VERSION} (magic {magic!r}, v{version})"
            )
        # A view, not a copy: frames are hashed and written into place without copying.
        data = memoryview(raw).cast("B")[HEADER_SIZE:]
        if clen != len(data):
            raise ChunkError(f"chunk frame declares {clen} data bytes but carries {len(data)}")
        frame = cls(pid, index, count, chunk_size, total, psha, csha, data)
        _check_geometry(frame)
        if hashlib.sha256(data).digest() != csha:
            raise ChunkError(f"chunk {index} of payload {pid.hex()} fails its SHA-256")
        return frame


def _check_geometry(frame: ChunkFrame) -> None:
    if frame.count < 1 or frame.index >= frame.count:
        raise ChunkError(f"chunk index {frame.index} is outside count {frame.count}")
    if frame.chunk_size < 1:
        raise ChunkError("chunk frame declares chunk size 0")
    expected_count = max(1, -(-frame.total_size // frame.chunk_size))
    if frame.count != expected_count:
        raise ChunkError(
            f"chunk count {frame.count} does not match {frame.total_size} bytes "
            f"in chunks of {frame.chunk_size} ({expected_count})"
        )
    last = frame.total_size - (frame.count - 1) * frame.chunk_size
    expected_len = last if frame.index == frame.count - 1 else frame.chunk_size
    if len(frame.data) != expected_len:
        raise ChunkError(
            f"chunk {frame.index} has {len(frame.data)} bytes, expected {expected_len}"
        )


def split_payload(payload: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[ChunkFrame]:
    """Cut ``payload`` into frames under one fresh random payload id."""
    for raw in encode_frames(payload, chunk_size):
        yield ChunkFrame.from_bytes(raw)


def encode_frames(payload: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
    """The encoded frames of ``payload``: what a sender publishes, one MQTT message each.

    Each chunk's bytes are copied once, into its frame; hashing reads the payload in place.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size {chunk_size} must be at least 1")
    view = memoryview(payload).cast("B")
    payload_id = os.urandom(PAYLOAD_ID_SIZE)
    payload_sha = hashlib.sha256(view).digest()
    count = max(1, -(-len(view) // chunk_size))
    for index in range(count):
        data = view[index * chunk_size : (index + 1) * chunk_size]
        header = _HEADER.pack(
            MAGIC,
            VERSION,
            payload_id,
            index,
            count,
            chunk_size,
            len(view),
            payload_sha,
            hashlib.sha256(data).digest(),
            len(data),
        )
        yield b"".join((header, data))


@dataclass(frozen=True)
class ReassemblyLimits:
    """Bounds on what a Reassembler will hold: `max_transfers` and `max_total_bytes` per
    pool, `sender_transfers` and `sender_bytes` (default: `max_payload_bytes`) per sender."""

    max_payload_bytes: int = MAX_TRANSFER_BYTES
    max_transfers: int = 16
    max_total_bytes: int = MAX_TRANSFERS_IN_FLIGHT_BYTES
    sender_transfers: int = 4
    sender_bytes: int | None = None
    spool_threshold: int = SPOOL_THRESHOLD_BYTES
    timeout_s: float = DEFAULT_TRANSFER_TIMEOUT_S
    spool_dir: Path | None = None
    remember_completed: int = 4096

    def __post_init__(self) -> None:
        for name in (
            "max_payload_bytes", "max_transfers", "max_total_bytes", "sender_transfers",
            "remember_completed",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"ReassemblyLimits.{name} must be at least 1")
        if self.sender_bytes is not None and self.sender_bytes < 1:
            raise ValueError("ReassemblyLimits.sender_bytes must be at least 1")
        if self.timeout_s <= 0:
            raise ValueError(f"ReassemblyLimits.timeout_s {self.timeout_s} must be positive")

    @property
    def quotas(self) -> QuotaLimits:
        """The per-pool and per-sender ceilings, as `broker.quotas.make_room` takes them."""
        sender_bytes = self.max_payload_bytes if self.sender_bytes is None else self.sender_bytes
        return QuotaLimits(
            self.max_transfers, self.max_total_bytes, self.sender_transfers, sender_bytes
        )


def check_spool_dir(folder: Path) -> None:
    """Return only if a spool file can be created in `folder`; ConfigError naming the fix."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ConfigError(
            f"spool folder {folder} is not usable ({error.strerror or error}): transfers "
            f"above {SPOOL_THRESHOLD_BYTES >> 20} MiB (a large model's release) are "
            "reassembled there; create it (mode 0700, the daemons make <state>/spool at start) "
            "on a volume with room, or fix its owner and permissions"
        ) from None


def prepare_spool_dir(folder: Path) -> Path:
    """Create `folder` private (0700) if it is missing and check it (`check_spool_dir`)."""
    try:
        make_private_dir(folder)
    except OSError as error:
        raise ConfigError(
            f"cannot create the spool folder {folder} ({error.strerror or error}); the state "
            "volume must be mounted read-write"
        ) from None
    check_spool_dir(folder)
    return folder


@dataclass(frozen=True)
class ExpiredTransfer:
    """A transfer dropped because it stopped making progress."""

    key: str
    payload_id: str
    received: int
    count: int
    total_size: int


@dataclass
class _Transfer:
    first: ChunkFrame
    origin: Origin
    started: float
    last_progress: float
    hashes: dict[int, bytes] = field(default_factory=dict)
    buffer: bytearray | None = None
    spool: BinaryIO | None = None

    def write(self, frame: ChunkFrame) -> None:
        offset = frame.index * frame.chunk_size
        if self.buffer is not None:
            self.buffer[offset : offset + len(frame.data)] = frame.data
            return
        assert self.spool is not None
        # Positional and unbuffered: a write that fails (disk full) leaves nothing pending
        # that could land later, and the same chunk written again goes to the same place.
        view = memoryview(frame.data).cast("B")
        while view:
            written = os.pwrite(self.spool.fileno(), view, offset)
            view, offset = view[written:], offset + written

    def read_all(self) -> bytes:
        if self.buffer is not None:
            return bytes(self.buffer)
        assert self.spool is not None
        total, done, parts = self.first.total_size, 0, []
        while done < total:
            part = os.pread(self.spool.fileno(), total - done, done)
            if not part:
                raise OSError(f"the spool file ended after {done} of {total} bytes")
            parts.append(part)
            done += len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()
        self.buffer = None


class Reassembler:
    """Collects chunk frames per (key, payload id) and returns each payload once, verified.

    ``key`` is where the frames came from (the topic), so one sender cannot complete or
    disturb a transfer on another topic; ``origin_of(key)`` says whom a transfer on it is
    charged to (default: the key itself, in one pool). Not thread-safe: call from one thread.
    """

    def __init__(
        self,
        limits: ReassemblyLimits,
        clock: Callable[[], float],
        origin_of: Callable[[str], Origin] = Origin,
    ) -> None:
        if limits.spool_dir is not None:
            check_spool_dir(limits.spool_dir)
        self.limits = limits
        self._clock = clock
        self._origin_of = origin_of
        self._open: dict[tuple[str, bytes], _Transfer] = {}
        self._done: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        self.expired: deque[ExpiredTransfer] = deque(maxlen=1024)
        self.evicted: deque[ExpiredTransfer] = deque(maxlen=1024)

    @property
    def open_transfers(self) -> int:
        """How many transfers are partly received."""
        return len(self._open)

    @property
    def held_bytes(self) -> int:
        """Declared bytes of every open transfer, in every pool."""
        return sum(t.first.total_size for t in self._open.values())

    def accept(self, key: str, frame: ChunkFrame) -> bytes | None:
        """Take one frame; return the whole payload when this frame completes it, else None.

        Raises ChunkError for a conflicting chunk or a payload whose hash fails, and
        PayloadTooLargeError when a limit would be broken. Identical repeats return None.
        Raises SpoolError when the chunk cannot be spooled or the payload read back: the
        chunk then counts as not received, so the same frame offered again is taken.
        """
        self.expire()
        ident = (key, frame.payload_id)
        if ident in self._done:
            log.debug(  # QoS 1 redelivers: routine, and a member could repeat one at will
                "ignoring repeated chunk %d of completed payload %s",
                frame.index,
                frame.payload_id.hex(),
            )
            return None
        transfer = self._open.get(ident) or self._start(ident, frame)
        first = transfer.first
        if (frame.count, frame.chunk_size, frame.total_size, frame.payload_sha256) != (
            first.count,
            first.chunk_size,
            first.total_size,
            first.payload_sha256,
        ):
            raise ChunkError(
                f"chunk {frame.index} of payload {frame.payload_id.hex()} conflicts with the "
                "transfer's declared size or hash; rejected"
            )
        held = transfer.hashes.get(frame.index)
        if held is not None:
            if held != frame.chunk_sha256:
                raise ChunkError(
                    f"chunk {frame.index} of payload {frame.payload_id.hex()} differs from the "
                    "copy already received; rejected"
                )
            log.debug(
                "ignoring repeated chunk %d of payload %s", frame.index, frame.payload_id.hex()
            )
            return None
        # A failed write still counts as activity: the chunk is being retried, and expiring
        # the transfer would throw away chunks that were already acknowledged.
        transfer.last_progress = self._clock()
        try:
            transfer.write(frame)
        except OSError as error:
            raise self._spool_error(ident, f"write chunk {frame.index} of", error) from error
        transfer.hashes[frame.index] = frame.chunk_sha256
        if len(transfer.hashes) < first.count:
            return None
        try:
            payload = transfer.read_all()
        except OSError as error:
            del transfer.hashes[frame.index]  # so that this frame, offered again, completes it
            raise self._spool_error(ident, "read back", error) from error
        return self._finish(ident, transfer, payload)

    def expire(self) -> list[ExpiredTransfer]:
        """Drop transfers idle longer than the timeout; record and return them."""
        now = self._clock()
        idle = [
            ident
            for ident, transfer in self._open.items()
            if now - transfer.last_progress >= self.limits.timeout_s
        ]
        return [self._drop(ident, Event.TRANSFER_EXPIRED) for ident in idle]

    def resume(self) -> None:
        """Restart every open transfer's idle clock: call on reconnecting, so that time
        spent disconnected (when no frame can arrive) does not count as idle."""
        now = self._clock()
        for transfer in self._open.values():
            transfer.last_progress = max(transfer.last_progress, now)

    def close(self) -> None:
        """Drop every open transfer and release its memory or spool file."""
        for transfer in self._open.values():
            transfer.close()
        self._open.clear()

    def _drop(self, ident: tuple[str, bytes], why: Event) -> ExpiredTransfer:
        transfer = self._open.pop(ident)
        transfer.close()
        first = transfer.first
        record = ExpiredTransfer(
            ident[0], ident[1].hex(), len(transfer.hashes), first.count, first.total_size
        )
        (self.expired if why is Event.TRANSFER_EXPIRED else self.evicted).append(record)
        fields = {
            "sender": transfer.origin.sender, "topic": record.key, "received": record.received,
            "count": record.count, "total_size": record.total_size,
        }  # fmt: skip
        level = logging.WARNING if why is Event.TRANSFER_EXPIRED else logging.INFO
        log.log(level, why, extra={"fields": fields})
        return record

    def _start(self, ident: tuple[str, bytes], frame: ChunkFrame) -> _Transfer:
        limits = self.limits
        if frame.total_size > limits.max_payload_bytes:
            raise PayloadTooLargeError(
                f"payload {frame.payload_id.hex()} declares {frame.total_size} bytes, over the "
                f"limit of {limits.max_payload_bytes}; raise max_payload_bytes if this is expected"
            )
        origin = self._origin_of(ident[0])
        holdings = [
            Holding(i, t.origin, t.first.total_size, t.last_progress) for i, t in self._open.items()
        ]
        for holding in make_room(holdings, origin, frame.total_size, limits.quotas):
            assert isinstance(holding.ident, tuple)
            self._drop(holding.ident, Event.TRANSFER_EVICTED)
        now = self._clock()
        transfer = _Transfer(first=frame, origin=origin, started=now, last_progress=now)
        if frame.total_size > limits.spool_threshold:
            # Large payloads go to an anonymous temporary file, so memory stays bounded by
            # max_transfers * spool_threshold whatever senders declare.
            try:
                transfer.spool = tempfile.TemporaryFile(dir=limits.spool_dir, buffering=0)
            except OSError as error:
                raise self._spool_error(ident, "create a spool file for", error) from error
        else:
            transfer.buffer = bytearray(frame.total_size)
        self._open[ident] = transfer
        return transfer

    def _spool_error(self, ident: tuple[str, bytes], action: str, error: OSError) -> SpoolError:
        where = self.limits.spool_dir or Path(tempfile.gettempdir())
        return SpoolError(
            f"cannot {action} payload {ident[1].hex()} on {ident[0]} in the spool folder "
            f"{where} ({error.strerror or error}); the chunk stays unacknowledged and is "
            "offered again: free space there, or recreate the folder (mode 0700)"
        )

    def _finish(self, ident: tuple[str, bytes], transfer: _Transfer, payload: bytes) -> bytes:
        del self._open[ident]
        transfer.close()
        self._done[ident] = None
        while len(self._done) > self.limits.remember_completed:
            self._done.popitem(last=False)
        if hashlib.sha256(payload).digest() != transfer.first.payload_sha256:
            raise ChunkError(
                f"payload {ident[1].hex()} on {ident[0]} fails its whole-payload SHA-256; dropped"
            )
        return payload
