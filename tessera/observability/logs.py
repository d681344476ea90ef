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
import time
from collections.abc import Mapping
from typing import IO, Any

from tessera.observability.events import Event

__all__ = ["JsonFormatter", "configure_logging", "log_event", "silence_dicom_libraries"]

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
