"""Structured JSON logs: one JSON object per line, the event's name and its fields.

A service logs `log.info(Event.ROUND_JOINED, extra={"fields": {...}})`, or
`log_event(log, Event.ROUND_JOINED, round=3)`: the message becomes the `event` key and the
names in `fields` become keys beside it (`tessera.observability.events` lists every event
and the fields it carries).

Nothing here may carry PHI: the formatter writes the message, the record's `fields` and an
exception's type, never a traceback's text; callers put only keyed hashes, counts and reason
codes in `fields`.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import IO, Any

from tessera.observability.events import Event

__all__ = [
    "JsonFormatter",
    "RepeatLimiter",
    "configure_logging",
    "log_event",
    "silence_dicom_libraries",
]

# Libraries whose records quote DICOM values (pydicom element values; pynetdicom dumps every
# DIMSE message at DEBUG, SOP Instance UIDs included). Nothing of theirs may reach an output.
_DICOM_LIBRARIES = ("pydicom", "pynetdicom")

# Keys the formatter owns; a record field with one of these names is renamed, not obeyed.
_RESERVED = ("ts", "level", "logger", "event", "error")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event, the record's `fields`, error type.

    Only `extra={"fields": {...}}` reaches the output; other record attributes and the raw
    `args` never do (the message is formatted first). Exceptions contribute their class name
    only, because a traceback's text can quote a DICOM value.
    """

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON object on one line."""
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            for key, value in fields.items():
                name = str(key)
                entry[f"field_{name}" if name in _RESERVED else name] = value
        if record.exc_info and record.exc_info[0] is not None:
            entry["error"] = record.exc_info[0].__name__
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(level: int | str = logging.INFO, stream: IO[str] | None = None) -> None:
    """Send every log record to `stream` (stderr) as JSON lines at `level`; idempotent.

    Replaces the root logger's handlers, so a second call does not duplicate lines.
    """
    if isinstance(level, str):
        numeric = logging.getLevelNamesMapping().get(level.upper())
        if numeric is None:
            raise ValueError(
                f"log level {level!r} is unknown: use DEBUG, INFO, WARNING, ERROR or CRITICAL"
            )
        level = numeric
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    silence_dicom_libraries()
    # The ONNX exporter's optimiser narrates every pass at INFO; an operator needs none of it.
    for chatty in ("onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(chatty).setLevel(logging.WARNING)


def silence_dicom_libraries() -> None:
    """Keep every record of pydicom and pynetdicom, their child loggers' included, from any
    handler, whatever the root level; idempotent.

    Disabling a logger silences only that logger: `pynetdicom.dimse` would still reach the
    root handler. Here the parents stop propagation (a child's record goes no further than
    its parent's handlers, which are none but a NullHandler) and their level is above
    CRITICAL, which every child without a level of its own inherits.
    """
    for name in _DICOM_LIBRARIES:
        logger = logging.getLogger(name)
        logger.setLevel(logging.CRITICAL + 1)
        logger.propagate = False
        logger.handlers[:] = [logging.NullHandler()]
        logger.disabled = True


def log_event(
    logger: logging.Logger, event: Event, level: int = logging.INFO, **fields: Any
) -> None:
    """Log `event` with structured `fields` (hashes, counts, codes only)."""
    logger.log(level, event, extra={"fields": fields})


class RepeatLimiter(logging.Filter):
    """Logs each (logger, event, sender) once per interval; counts the repeats and logs
    them as one `log-suppressed` line per key at `flush()`.

    Only records whose fields name a `sender` (a member whose messages caused them: a chunk
    or message refused, a transfer displaced) are limited; every other record passes. So a
    member that floods an aggregator costs it a few lines per interval, whatever the
    flood's size, and one sender's repeats never hide another sender's first line.
    Install it on the handlers (`install`), call `flush()` periodically; thread-safe.
    """

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._window_start = clock()
        self._seen: dict[tuple[str, str, str], int] = {}  # key -> repeats not logged
        self._logger = logging.getLogger("tessera.observability.logs")

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a repeat of a key already logged in this interval."""
        fields = getattr(record, "fields", None)
        sender = fields.get("sender") if isinstance(fields, Mapping) else None
        if sender is None or record.msg == Event.LOG_SUPPRESSED:
            return True
        key = (record.name, str(record.msg), str(sender))
        with self._lock:
            if key not in self._seen:
                self._seen[key] = 0
                return True
            self._seen[key] += 1
            return False

    def flush(self) -> None:
        """Once the interval is over: one `log-suppressed` line per key that had repeats,
        then a new interval."""
        with self._lock:
            if self._clock() - self._window_start < self.interval_s:
                return
            seen, self._seen = self._seen, {}
            self._window_start = self._clock()
        for (_name, event, sender), count in sorted(seen.items()):
            if count:
                fields = {"suppressed_event": event, "sender": sender, "suppressed": count,
                          "interval_s": self.interval_s}  # fmt: skip
                self._logger.warning(Event.LOG_SUPPRESSED, extra={"fields": fields})

    def install(self) -> RepeatLimiter:
        """Add this filter to every handler of the root logger; return it."""
        for handler in logging.getLogger().handlers:
            handler.addFilter(self)
        return self

    def uninstall(self) -> None:
        """Remove this filter from the root logger's handlers."""
        for handler in logging.getLogger().handlers:
            handler.removeFilter(self)
