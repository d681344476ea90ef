"""Structured JSON logs for the node (stdlib logging, one JSON object a line).

`tessera/observability.py` did not exist when the intake was written; when it lands, switch
`configure_json_logging` to its formatter. Callers pass fields through `extra={"fields": ...}`
and must only put keyed hashes, counts and reason codes there, never DICOM values.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any


class JsonFormatter(logging.Formatter):
    """Render a record as one JSON line: time, level, logger, event and the record's fields."""

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
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info and record.exc_info[0] is not None:
            # The type only: a traceback's text can quote a DICOM value.
            entry["error"] = record.exc_info[0].__name__
        return json.dumps(entry, sort_keys=False, default=str)


def configure_json_logging(level: int = logging.INFO, stream: IO[str] | None = None) -> None:
    """Send the `tessera` loggers to `stream` (stderr) as JSON lines; idempotent."""
    logger = logging.getLogger("tessera")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    # pydicom quotes element values in its log records; keep them out of the node's output.
    logging.getLogger("pydicom").disabled = True


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log `event` with structured `fields` (hashes, counts, codes only)."""
    logger.log(level, event, extra={"fields": fields})
