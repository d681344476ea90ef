"""Structured JSON logs for the node, through the shared formatter in `tessera.observability.logs`.

Callers pass fields through `extra={"fields": ...}` and must only put keyed hashes, counts
and reason codes there, never DICOM values.
"""

from __future__ import annotations

import logging
from typing import IO, Any

from tessera.observability.logs import configure_logging


def configure_json_logging(level: int = logging.INFO, stream: IO[str] | None = None) -> None:
    """Send every log record to `stream` (stderr) as JSON lines; idempotent."""
    configure_logging(level, stream)


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log `event` with structured `fields` (hashes, counts, codes only)."""
    logger.log(level, event, extra={"fields": fields})
