"""Every event a Tessera service logs, by name, and the fields each one carries.

A service logs `log.info(Event.ROUND_JOINED, extra={"fields": {...}})`; a StrEnum formats to
its value, so the JSON line reads `"event": "round-joined"`. The demo's progress display and
the end-to-end tests read the logs back and compare against the same members, so a renamed
event breaks at import or in a test, not silently in a dashboard.

`EVENT_FIELDS` lists the fields an event may carry, as the call site names them (an event
logged from several places, such as `message-rejected`, carries a subset at each). A field
that shares its name with one of the formatter's own keys is written with a `field_` prefix
(`error` becomes `field_error`; `tessera.observability.logs`). Fields hold keyed hashes,
counts, reason codes and exception type names only, never a DICOM value.

The values are the wire names operators already grep for. Most are kebab-case; the intake
and receiver events keep their dotted names and the `tessera node serve` and HTTP-server
events their spaced ones.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType

__all__ = ["EVENT_FIELDS", "Event"]


@enum.unique
class Event(enum.StrEnum):
    """One logged event; the value is the `event` key of its JSON line."""

    # --- any service's HTTP server (tessera.observability.http) -----------------------------
    READINESS_CHECK_RAISED = "readiness check raised"  # a /readyz check raised: not ready
    ROUTE_HANDLER_FAILED = "route handler failed"  # a mounted route raised: answered 500
    HTTP_REQUEST = "http request"  # an access line (DEBUG)
    HTTP_BUSY = "http busy"  # every worker busy: connections closed at once (first of a run)
    HTTP_TLS_FAILED = "tls handshake failed"  # a client that did not complete TLS (DEBUG)

    # --- any service's audit log (tessera.governance.audit) ------------------------------
    AUDIT_ANCHOR = "audit-anchor"  # the audit log's latest SEQ:HASH: keep it (verify --anchor)
    AUDIT_ANCHOR_NOT_WRITTEN = "audit-anchor-not-written"  # the anchor file refused a line

    # --- a service's MQTT link (broker.service_link, broker.outbox) -------------------------
    INSECURE_BROKER = "insecure-broker"  # connecting to the plaintext development broker
    RETAIN_SKIPPED = "retain-skipped"  # a "retained" payload too large for one frame
    CHUNK_REJECTED = "chunk-rejected"  # a chunk frame refused (malformed, over a quota)
    TRANSFER_EXPIRED = "transfer-expired"  # a partly received payload idle too long, dropped
    TRANSFER_EVICTED = "transfer-evicted"  # a partly received payload displaced by a quota
    LOG_SUPPRESSED = "log-suppressed"  # how many repeats of one sender's event were not logged
    BROKER_CONNECTED = "broker-connected"  # (re)connected; down_s: how long it was away
    BROKER_DISCONNECTED = "broker-disconnected"  # lost the broker (once per outage)
    PUBLISH_STALLED = "publish-stalled"  # unacknowledged for publish_timeout_s; kept queued
    PUBLISH_RESUMED = "publish-resumed"  # a stalled payload went through
    PUBLISH_REFUSED = "publish-refused"  # the broker refused a payload (ACL): dropped
    OUTBOX_ABANDONED = "outbox-abandoned"  # stopped with payloads the broker never took
    # A message its handler could not take now (spool folder missing, disk full): kept
    # unacknowledged and offered again (broker.session); then taken after `tries`.
    DELIVERY_DEFERRED = "delivery-deferred"
    DELIVERY_RESUMED = "delivery-resumed"

    # --- any service's state folder (tessera.files: DiskFull, DiskWatch) --------------------
    DISK_FULL = "disk-full"  # a write found no space: not ready, waiting (says where, how much)
    DISK_SPACE_RETURNED = "disk-space-returned"  # enough space again: resuming

    # --- the node daemon (node.daemon) ------------------------------------------------------
    NODE_STARTED = "node-started"
    NODE_STOPPED = "node-stopped"
    EPSILON_RECONCILED = "epsilon-reconciled"  # the ledger was ahead of the audit log
    EPSILON_AUDIT_BEHIND = "epsilon-audit-behind"  # ...by more than one interrupted round
    LEDGER_BEHIND = "ledger-behind"  # ledger missing or behind the audit log: no training
    LEDGER_RESTORED = "ledger-restored"  # the ledger holds the audit log's charges again
    MESSAGE_REJECTED = "message-rejected"  # a message failed its checks (node or aggregator)
    ROUND_ABORT_RECEIVED = "round-abort-received"  # the leader's RoundAbort reached this node
    ROUND_DROPPED = "round-dropped"  # a RoundOpen arrived while the worker queue was full
    ROUND_REFUSED = "round-refused"  # the site's policy or the study's terms said no
    ROUND_JOINED = "round-joined"  # trained and sent one sealed share per aggregator
    ROUND_FAILED = "round-failed"  # answering a round or a candidate raised
    # This node's clock, measured against the leader's signed RoundOpen, is further off
    # than `max_clock_skew_s`: rounds are refused ("clock-skew") and /readyz says why.
    CLOCK_SKEW = "clock-skew"
    INTAKE = "intake"  # one intake pass's summary
    INTAKE_FAILED = "intake-failed"
    CANDIDATE_DROPPED = "candidate-dropped"  # a candidate arrived while the queue was full
    CANDIDATE_REFUSED = "candidate-refused"  # the leader's candidate failed verification
    CANDIDATE_IGNORED = "candidate-ignored"  # a candidate of a round this site did not join
    PRIVACY_AUDIT = "privacy-audit"  # audited a candidate and sent the signed report
    PRIVACY_AUDIT_FAILED = "privacy-audit-failed"  # no report sent: the release waits
    RELEASE_REFUSED = "release-refused"
    RELEASE_INSTALLED = "release-installed"
    MODEL_UNUSABLE = "model-unusable"  # the store's current model did not load: kept the old
    MODEL_SWAPPED = "model-swapped"  # inference now serves another version
    SHARE_CONFIRMED = "share-confirmed"  # an aggregator's receipts hold this node's share
    SHARE_NOT_RECEIVED = "share-not-received"  # an aggregator closed a round without it
    MODEL_DAMAGED = "model-damaged"  # a stored version's files fail their hashes
    MODEL_REPAIRED = "model-repaired"  # ...rewritten from a verified copy of its release
    RELEASE_REFETCH_REQUESTED = "release-refetch-requested"  # asked the aggregators again
    RELEASE_REFETCH_FAILED = "release-refetch-failed"  # ...could not: asks at the next interval

    # --- the node's intake and DICOM receiver (node.intake) ---------------------------------
    INTAKE_START = "intake.start"
    INTAKE_DONE = "intake.done"
    INTAKE_QUARANTINE = "intake.quarantine"  # one file quarantined, by keyed hash
    RECEIVER_LISTENING = "receiver.listening"
    RECEIVER_ASSOCIATION = "receiver.association"
    RECEIVER_REJECTED = "receiver.rejected"  # an association refused (A-ASSOCIATE-RJ)
    RECEIVER_CLASSES_REFUSED = "receiver.classes_refused"  # no context: a class never trained on
    RECEIVER_UNREADABLE = "receiver.unreadable"
    RECEIVER_TOO_LARGE = "receiver.too_large"  # an object cut off (A-ABORT) past the size cap
    RECEIVER_STORE_REFUSED = "receiver.store_refused"  # a C-STORE answered with a failure
    RECEIVER_DUPLICATE = "receiver.duplicate"  # the same object again: success, nothing written
    RECEIVER_WRITE_FAILED = "receiver.write_failed"
    RECEIVER_STORED = "receiver.stored"

    # --- `tessera node serve` (node.inference) ----------------------------------------------
    SERVING = "serving"
    MODEL_UPDATE_REJECTED = "model update rejected; still serving the old one"
    SERVE_MODEL_SWAPPED = "model swapped"  # the watched model file changed and loaded
    INFERENCE_REQUEST = "inference request"

    # --- the aggregator daemon (aggregator.daemon) ------------------------------------------
    AGGREGATOR_STARTED = "aggregator-started"
    AGGREGATOR_STOPPED = "aggregator-stopped"
    ROUND_RECOVERED = "round-recovered"  # a round a crash left in flight, aborted at start
    ROUND_OPENED = "round-opened"  # the leader opened a round
    ROUND_NOT_OPENED = "round-not-opened"  # the leader would not open a round (says why)
    INTAKE_THROTTLED = "intake-throttled"  # a member's messages over its budget, dropped

    # --- the aggregator's round protocol (aggregator.service) -------------------------------
    SHARE_DUPLICATE = "share-duplicate"  # a node's second share for the round, ignored
    CANDIDATE_BUILT = "candidate-built"  # the release candidate awaiting the privacy audits
    AUDIT_REPORT = "audit-report"  # a site's signed audit report arrived
    AUDIT_PASSED = "audit-passed"  # the release gate passed
    ROUND_ABORTED = "round-aborted"  # this aggregator aborted the round (and says why)
    RELEASE_CAUGHT_UP = "release-caught-up"  # registered a release signed before a restart
    RELEASE_RESENT = "release-resent"  # sent a node a registered release it asked for again
    MODEL_RELEASED = "model-released"
    STATEMENT_MISMATCH = "statement-mismatch"  # nodes left out: their sealed statements differ
    AUDIT_REPORT_CONFLICT = "audit-report-conflict"  # one site sent two different reports
    WAL_TRUNCATE_INCOMPLETE = "wal-truncate-incomplete"  # a reader held the WAL; retried


EVENT_FIELDS: Mapping[Event, tuple[str, ...]] = MappingProxyType({
    Event.READINESS_CHECK_RAISED: ("check", "error_type"),
    Event.ROUTE_HANDLER_FAILED: ("route", "error_type"),
    Event.HTTP_REQUEST: ("method", "path"),
    Event.HTTP_BUSY: ("max_workers", "port"),
    Event.HTTP_TLS_FAILED: ("error_type",),
    Event.AUDIT_ANCHOR: ("anchor",),
    Event.AUDIT_ANCHOR_NOT_WRITTEN: ("path", "error_type"),
    Event.INSECURE_BROKER: (),
    Event.RETAIN_SKIPPED: ("bytes",),
    Event.CHUNK_REJECTED: ("sender", "topic", "reason"),
    Event.TRANSFER_EXPIRED: ("sender", "topic", "received", "count", "total_size"),
    Event.TRANSFER_EVICTED: ("sender", "topic", "received", "count", "total_size"),
    Event.LOG_SUPPRESSED: ("suppressed_event", "sender", "suppressed", "interval_s"),
    Event.BROKER_CONNECTED: ("session_present", "down_s", "queued"),
    Event.BROKER_DISCONNECTED: ("reason", "queued"),
    Event.PUBLISH_STALLED: ("kind", "waited_s", "queued"),
    Event.PUBLISH_RESUMED: ("kind", "waited_s"),
    Event.PUBLISH_REFUSED: ("kind", "error", "reason"),
    Event.OUTBOX_ABANDONED: ("queued",),
    Event.DELIVERY_DEFERRED: ("topic", "reason"),
    Event.DELIVERY_RESUMED: ("topic", "tries"),
    Event.DISK_FULL: ("path", "needed_bytes", "free_bytes", "reason"),
    Event.DISK_SPACE_RETURNED: ("path", "free_bytes"),
    Event.NODE_STARTED: ("site", "study", "model_version", "http_port", "inference_port"),
    Event.NODE_STOPPED: (),
    Event.EPSILON_RECONCILED: ("study",),
    Event.EPSILON_AUDIT_BEHIND: ("study", "rounds", "epsilon"),
    Event.LEDGER_BEHIND: ("study", "ledger_epsilon", "audit_epsilon", "rounds", "reason"),
    Event.LEDGER_RESTORED: ("study", "epsilon"),
    Event.MESSAGE_REJECTED: ("kind", "error", "reason", "round", "sender"),
    Event.ROUND_ABORT_RECEIVED: ("round", "reason"),
    Event.ROUND_DROPPED: ("round",),
    Event.ROUND_REFUSED: ("round", "reason", "detail"),
    Event.ROUND_JOINED: (
        "round", "samples", "epsilon_round", "epsilon_total", "validation_loss",
        "validation_accuracy", "bytes_sent", "plaintext_bytes",
    ),
    Event.ROUND_FAILED: ("error", "reason"),
    Event.CLOCK_SKEW: ("offset_s", "tolerated_s", "reason"),
    Event.INTAKE: (
        "seen", "unchanged", "ingested", "quarantined", "dropped", "reasons", "labels_out_of_set",
    ),
    Event.INTAKE_FAILED: ("error", "reason"),
    Event.CANDIDATE_DROPPED: ("reason",),
    Event.CANDIDATE_REFUSED: ("error",),
    Event.CANDIDATE_IGNORED: ("round",),
    Event.PRIVACY_AUDIT: (
        "round", "auc", "tpr_at_0_1pct_fpr", "tpr_at_1pct_fpr", "empirical_epsilon",
        "accountant_epsilon",
    ),
    Event.PRIVACY_AUDIT_FAILED: ("round", "outcome", "reason"),
    Event.RELEASE_REFUSED: ("version", "reason", "error"),
    Event.RELEASE_INSTALLED: ("version", "round", "serving"),
    Event.MODEL_UNUSABLE: ("version", "reason"),
    Event.MODEL_SWAPPED: ("version", "pinned"),
    Event.SHARE_CONFIRMED: ("round", "aggregator"),
    Event.SHARE_NOT_RECEIVED: ("round", "aggregator", "held"),
    Event.MODEL_DAMAGED: ("version", "reason"),
    Event.MODEL_REPAIRED: ("version", "source"),
    Event.RELEASE_REFETCH_REQUESTED: ("version",),
    Event.RELEASE_REFETCH_FAILED: ("version", "error"),
    Event.INTAKE_START: ("scan", "digest", "stale_temp"),
    Event.INTAKE_DONE: ("scan", "summary"),
    Event.INTAKE_QUARANTINE: ("file", "reason", "detail"),
    Event.RECEIVER_LISTENING: ("host", "port", "ae_title"),
    Event.RECEIVER_ASSOCIATION: ("calling_aet",),
    Event.RECEIVER_REJECTED: ("reason",),
    Event.RECEIVER_CLASSES_REFUSED: ("classes",),
    Event.RECEIVER_UNREADABLE: (),
    Event.RECEIVER_TOO_LARGE: ("size", "limit"),
    Event.RECEIVER_STORE_REFUSED: ("reason", "instance", "size"),
    Event.RECEIVER_DUPLICATE: ("instance",),
    Event.RECEIVER_WRITE_FAILED: ("instance", "error"),
    Event.RECEIVER_STORED: ("instance", "size"),
    Event.SERVING: ("host", "port", "tls", "model_version"),
    Event.MODEL_UPDATE_REJECTED: ("error",),
    Event.SERVE_MODEL_SWAPPED: ("model_version",),
    Event.INFERENCE_REQUEST: ("method", "path", "status", "model_version"),
    Event.AGGREGATOR_STARTED: ("aggregator", "study", "leader", "http_port"),
    Event.AGGREGATOR_STOPPED: (),
    Event.ROUND_RECOVERED: ("study", "round"),
    Event.ROUND_OPENED: ("round", "algorithm", "expected"),
    Event.ROUND_NOT_OPENED: ("reason",),
    Event.INTAKE_THROTTLED: ("sender", "dropped", "interval_s"),
    Event.SHARE_DUPLICATE: ("round",),
    Event.CANDIDATE_BUILT: ("round", "version"),
    Event.AUDIT_REPORT: ("round", "site"),
    Event.AUDIT_PASSED: ("round", "detail"),
    Event.ROUND_ABORTED: ("round", "reason"),
    Event.RELEASE_CAUGHT_UP: ("round", "version"),
    Event.RELEASE_RESENT: ("node", "version"),
    Event.MODEL_RELEASED: ("round", "version"),
    Event.STATEMENT_MISMATCH: ("round", "nodes"),
    Event.AUDIT_REPORT_CONFLICT: ("round", "site"),
    Event.WAL_TRUNCATE_INCOMPLETE: ("reason",),
})  # fmt: skip
