"""The event catalogue: every event documented, names unique, and every structured log call in
the services naming its event through `Event` rather than a string literal."""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import pytest

from tessera.observability.events import EVENT_FIELDS, Event
from tessera.observability.logs import JsonFormatter

ROOT = Path(__file__).resolve().parents[2]
SERVICE_PACKAGES = ("tessera", "node", "aggregator", "broker")
LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical"}

def test_every_event_documents_its_fields() -> None:
    assert set(EVENT_FIELDS) == set(Event)
    for event, fields in EVENT_FIELDS.items():
        assert len(set(fields)) == len(fields), f"{event.name} lists a field twice"


def test_event_names_are_unique() -> None:
    # An equal value would make a silent alias, not a second member.
    values = [member.value for member in Event.__members__.values()]
    assert len(values) == len(set(values))


def test_an_event_formats_to_its_wire_name() -> None:
    logger = logging.getLogger("tessera.test.events")
    record = logger.makeRecord(
        logger.name, logging.INFO, __file__, 1, Event.ROUND_JOINED, (), None,
        extra={"fields": {"round": 3}},
    )  # fmt: skip
    entry = json.loads(JsonFormatter().format(record))
    assert (entry["event"], entry["round"]) == ("round-joined", 3)
    assert entry["event"] == Event.ROUND_JOINED


def _event_argument(call: ast.Call) -> ast.expr | None:
    """The event a structured log call names, or None for a call that is not one.

    Structured: `<logger>.info(event, extra=...)` (any level method, or `.log(level, event,
    extra=...)`) and `log_event(logger, event, ...)`.
    """
    func = call.func
    if isinstance(func, ast.Name) and func.id == "log_event":
        return call.args[1] if len(call.args) > 1 else None
    if not isinstance(func, ast.Attribute) or "log" not in ast.unparse(func.value).lower():
        return None
    if not any(keyword.arg == "extra" for keyword in call.keywords):
        return None  # a prose message with %-arguments (broker.session), not an event
    position = 1 if func.attr == "log" else 0 if func.attr in LOG_METHODS else None
    if position is None or len(call.args) <= position:
        return None
    return call.args[position]


def _literal_events() -> list[str]:
    found = []
    for package in SERVICE_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not isinstance(node, ast.Call):
                    continue
                event = _event_argument(node)
                if isinstance(event, ast.Constant | ast.JoinedStr):
                    found.append(f"{relative}:{node.lineno}: {ast.unparse(event)}")
    return found


def test_services_name_every_logged_event_through_the_enum() -> None:
    literals = _literal_events()
    if literals:
        pytest.fail(
            "structured log calls name their event with a literal; use a member of "
            "tessera.observability.events.Event (add one, with its fields, if none fits):\n"
            + "\n".join(literals)
        )
