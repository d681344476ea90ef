"""Health server over real HTTP (urllib to a real port), the JSON log formatter, the metrics."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tessera.errors import CodecError
from tessera.observability.events import Event
from tessera.observability.http import HealthServer, Request, Response
from tessera.observability.logs import JsonFormatter, RepeatLimiter, configure_logging
from tessera.observability.metrics import ServiceMetrics


def fetch(url: str, data: bytes | None = None, method: str | None = None) -> tuple[int, bytes]:
    """Status and body of one real HTTP request; error statuses are returned, not raised."""
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


class Flag:
    """A readiness check whose answer a test flips."""

    def __init__(self, value: bool) -> None:
        self.value = value

    def __call__(self) -> bool:
        return self.value


@pytest.fixture
def served() -> Iterator[tuple[str, dict[str, Flag], ServiceMetrics]]:
    """A running server on a free loopback port with two readiness checks and one route."""
    registry = CollectorRegistry()
    metrics = ServiceMetrics(
        registry, refusal_reasons=("paused",), quarantine_reasons=("truncated",)
    )
    flags = {"broker connected": Flag(False), "keys loaded": Flag(True)}

    def echo(request: Request) -> Response:
        return Response.json(200, {"length": len(request.body), "query": request.query})

    def broken(request: Request) -> Response:
        raise RuntimeError("Patient^Name in a message that must not escape")

    routes = {("POST", "/v1/echo"): echo, ("GET", "/v1/broken"): broken}
    server = HealthServer(0, registry, flags, routes, host="127.0.0.1", max_body_bytes=1024)
    with server:
        yield f"http://127.0.0.1:{server.port}", flags, metrics


def test_healthz_answers_while_not_ready(
    served: tuple[str, dict[str, Flag], ServiceMetrics],
) -> None:
    url, _, _ = served
    status, body = fetch(url + "/healthz")
    assert (status, json.loads(body)) == (200, {"status": "alive"})


def test_readyz_names_failing_checks_then_turns_ready(
    served: tuple[str, dict[str, Flag], ServiceMetrics],
) -> None:
    url, flags, _ = served
    status, body = fetch(url + "/readyz")
    assert status == 503
    assert json.loads(body) == {"ready": False, "failing": ["broker connected"]}
    flags["broker connected"].value = True
    status, body = fetch(url + "/readyz")
    assert (status, json.loads(body)) == (200, {"ready": True, "failing": []})
    flags["keys loaded"].value = False
    assert fetch(url + "/readyz")[0] == 503


def test_a_raising_readiness_check_is_not_ready() -> None:
    def explode() -> bool:
        raise OSError("disk gone")

    with HealthServer(0, CollectorRegistry(), {"model verified": explode}, host="127.0.0.1") as s:
        status, body = fetch(f"http://127.0.0.1:{s.port}/readyz")
    assert (status, json.loads(body)["failing"]) == (503, ["model verified"])


def test_readyz_carries_warnings_ready_or_not_and_survives_a_broken_one() -> None:
    notes: list[str] = []
    checks = {"model verified": Flag(True)}
    with HealthServer(0, CollectorRegistry(), checks, host="127.0.0.1",
                      warnings=lambda: list(notes)) as s:  # fmt: skip
        url = f"http://127.0.0.1:{s.port}/readyz"
        assert json.loads(fetch(url)[1]) == {"ready": True, "failing": []}
        notes.append("model version 2 is damaged; serving version 1")
        status, body = fetch(url)
        assert (status, json.loads(body)["warnings"]) == (200, notes)
        checks["model verified"].value = False
        assert json.loads(fetch(url)[1])["warnings"] == notes
    with HealthServer(0, CollectorRegistry(), {}, host="127.0.0.1",
                      warnings=lambda: [][0]) as s:  # fmt: skip
        status, body = fetch(f"http://127.0.0.1:{s.port}/readyz")
    assert (status, json.loads(body)) == (200, {"ready": True, "failing": []})


def test_metrics_exposes_the_service_registry_only(
    served: tuple[str, dict[str, Flag], ServiceMetrics],
) -> None:
    url, _, metrics = served
    metrics.round_joined()
    metrics.round_refused("paused")
    metrics.add_samples(128)
    metrics.set_epsilon_spent("study-7", 0.75)
    metrics.set_model(3, bytes(range(32)))
    metrics.quarantine("truncated")
    metrics.add_wire_bytes("sent", 4096)
    with metrics.time_inference() as timer:
        timer.outcome = "ok"
    status, body = fetch(url + "/metrics")
    assert status == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    assert samples[("tessera_rounds_joined_total", ())] == 1
    assert samples[("tessera_rounds_refused_total", (("reason", "paused"),))] == 1
    assert samples[("tessera_samples_trained_total", ())] == 128
    assert samples[("tessera_epsilon_spent", (("study", "study-7"),))] == 0.75
    assert samples[("tessera_model_version", ())] == 3
    assert (
        samples[("tessera_model_info", (("model_hash", "0001020304050607"), ("version", "3")))] == 1
    )
    assert samples[("tessera_quarantined_total", (("reason", "truncated"),))] == 1
    assert samples[("tessera_wire_bytes_total", (("direction", "sent"),))] == 4096
    assert samples[("tessera_wire_bytes_total", (("direction", "received"),))] == 0
    assert samples[("tessera_inference_latency_seconds_count", (("outcome", "ok"),))] == 1
    # A per-service registry: the process-global default's collectors are absent.
    assert not any(name.startswith("python_gc") for name, _ in samples)


def test_two_services_in_one_process_keep_separate_counters() -> None:
    first, second = ServiceMetrics(CollectorRegistry()), ServiceMetrics(CollectorRegistry())
    first.round_joined()
    assert first.rounds_joined._value.get() == 1
    assert second.rounds_joined._value.get() == 0


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.round_refused("Smith^John refused"),
        lambda m: m.quarantine("1.2.840.113619.2.55.3"),
        lambda m: m.set_epsilon_spent("Smith John", 1.0),
        lambda m: m.add_wire_bytes("sideways", 1),
        lambda m: m.add_samples(-1),
    ],
)
def test_label_values_outside_the_fixed_sets_are_refused(call: object) -> None:
    metrics = ServiceMetrics(CollectorRegistry(), ("paused",), ("truncated",))
    with pytest.raises((ValueError, CodecError)):
        call(metrics)  # type: ignore[operator]


def test_inference_timer_defaults_to_error_when_the_block_raises() -> None:
    metrics = ServiceMetrics(CollectorRegistry())
    with pytest.raises(KeyError), metrics.time_inference():
        raise KeyError("boom")
    errors = metrics.inference_latency.labels(outcome="error")
    assert errors._sum.get() > 0  # one observation landed under "error"


def test_mounted_routes_body_limit_and_errors(
    served: tuple[str, dict[str, Flag], ServiceMetrics],
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, _, _ = served
    status, body = fetch(url + "/v1/echo?x=1", data=b"a" * 100)
    assert (status, json.loads(body)) == (200, {"length": 100, "query": "x=1"})
    assert fetch(url + "/v1/echo", data=b"a" * 2048)[0] == 413
    assert fetch(url + "/v1/echo")[0] == 405  # GET on a POST-only route
    assert fetch(url + "/nowhere")[0] == 404
    assert fetch(url + "/healthz", data=b"x")[0] == 405
    with caplog.at_level(logging.ERROR, logger="tessera.observability.http"):
        status, body = fetch(url + "/v1/broken")
    assert (status, json.loads(body)) == (500, {"error": "internal error"})
    # The handler's message (which could quote patient data) reaches neither client nor log.
    assert b"Patient" not in body
    assert "Patient" not in caplog.text
    assert [r.fields["error_type"] for r in caplog.records] == ["RuntimeError"]  # type: ignore[attr-defined]


def test_routes_may_not_shadow_builtins() -> None:
    with pytest.raises(ValueError, match="clashes"):
        HealthServer(0, CollectorRegistry(), routes={("GET", "/metrics"): lambda r: Response(200)})


def test_server_serves_concurrent_requests_and_closes_its_port() -> None:
    server = HealthServer(0, CollectorRegistry(), host="127.0.0.1").start()
    url = f"http://127.0.0.1:{server.port}/healthz"
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(fetch(url)[0])) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    server.close()
    assert results == [200] * 8
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)


def _format(record_args: tuple[object, ...], **extra: object) -> dict[str, object]:
    logger = logging.getLogger("tessera.test.json")
    record = logger.makeRecord(
        logger.name,
        logging.WARNING,
        __file__,
        1,
        "joined round %d of %s",
        record_args,
        None,
        extra=extra,
    )
    return json.loads(JsonFormatter().format(record))


def test_json_formatter_writes_only_its_keys_and_the_fields() -> None:
    entry = _format(
        (4, "study-7"),
        fields={"round": 4, "level": "spoofed"},
        patient_name="Smith^John",  # an unrelated extra attribute must not be written
    )
    assert entry.pop("ts")
    assert entry == {
        "level": "warning",
        "logger": "tessera.test.json",
        "event": "joined round 4 of study-7",
        "round": 4,
        "field_level": "spoofed",
    }


def test_json_formatter_writes_an_exception_type_not_its_text() -> None:
    logger = logging.getLogger("tessera.test.json")
    try:
        raise ValueError("PatientName=Smith^John")
    except ValueError:
        record = logger.makeRecord(
            logger.name, logging.ERROR, __file__, 1, "intake failed", (), sys.exc_info()
        )
    line = JsonFormatter().format(record)
    assert "\n" not in line
    assert json.loads(line)["error"] == "ValueError"
    assert "Smith" not in line


def test_configure_logging_is_idempotent_and_rejects_unknown_levels() -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("pydicom").disabled)
    stream = io.StringIO()
    try:
        configure_logging("debug", stream)
        configure_logging("INFO", stream)
        logging.getLogger("tessera.test").info("ready", extra={"fields": {"port": 8080}})
        logging.getLogger("tessera.test").debug("hidden")
        lines = stream.getvalue().splitlines()
        assert len(lines) == 1
        assert json.loads(lines[0])["port"] == 8080
        with pytest.raises(ValueError, match="unknown"):
            configure_logging("loud")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.getLogger("pydicom").disabled = saved[2]


def test_repeats_of_one_senders_event_are_logged_once_per_interval_then_counted() -> None:
    now = [0.0]
    stream = io.StringIO()
    logger = logging.getLogger("tessera.test.repeats")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    limiter = RepeatLimiter(10.0, clock=lambda: now[0])
    handler.addFilter(limiter)
    logger.addHandler(handler)
    summaries = logging.getLogger("tessera.observability.logs")
    summaries.addHandler(handler)
    logger.setLevel(logging.INFO)
    summaries.setLevel(logging.INFO)
    try:
        for _ in range(500):
            logger.warning(Event.CHUNK_REJECTED, extra={"fields": {"sender": "site-c"}})
        logger.warning(Event.CHUNK_REJECTED, extra={"fields": {"sender": "site-a"}})
        for _ in range(3):  # not a member's: never limited
            logger.warning(Event.ROUND_ABORTED, extra={"fields": {"round": 1}})
        limiter.flush()  # the interval is not over: nothing yet
        now[0] = 10.0
        limiter.flush()
    finally:
        logger.removeHandler(handler)
        summaries.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["event"], e.get("sender")) for e in lines] == [
        ("chunk-rejected", "site-c"), ("chunk-rejected", "site-a"),
        *[("round-aborted", None)] * 3,
        ("log-suppressed", "site-c"),
    ]  # fmt: skip
    assert (lines[-1]["suppressed_event"], lines[-1]["suppressed"]) == ("chunk-rejected", 499)
