"""Size ceilings: how many bytes each reader takes before it refuses, all in one place.

Each limit bounds something that comes from outside the process (over MQTT or HTTP, from a
PACS, or from a file another process wrote), so that a peer or a damaged file cannot make a
reader allocate without bound. Each name says what it bounds, and where two readers bound the
same thing they use the same name. Limits that belong to another system (protobuf's 2 GiB
message, Kubernetes' 1 MiB Secret, MQTT's 256 MiB packet) stay beside the code that talks to
that system.
"""

from __future__ import annotations

_KIB = 1 << 10
_MIB = 1 << 20
_GIB = 1 << 30

# --- Protocol messages (tessera.wire) ---------------------------------------------------------

# A model release's weights, ONNX export and card together, wherever a release is parsed (node,
# aggregator registry, `tessera models show`). A ResNet-18 release is about 85 MiB.
MAX_RELEASE_PAYLOAD_BYTES = 512 * _MIB
# One partial sum parsed on its own (`PartialSum.from_bytes` default); inside an envelope the
# envelope's own limit applies.
MAX_PARTIAL_SUM_BYTES = 1 * _GIB
# Any signed envelope an aggregator opens; the largest is a release with its weights and ONNX
# export.
MAX_AGGREGATOR_MESSAGE_BYTES = 512 * _MIB
# A round's control envelope at a node (RoundOpen, RoundAbort): a few hundred bytes plus two id
# lists, so anything near this is not one.
MAX_ROUND_OPEN_BYTES = 1 * _MIB
# An aggregator's receipts at a node: 32 bytes per share it holds, at most 10,000 of them.
MAX_RECEIPT_SET_BYTES = 1 * _MIB
# A site's signed privacy-audit report at an aggregator: a few kilobytes of aggregate figures.
MAX_AUDIT_REPORT_BYTES = 64 * _KIB

# --- Transport (broker) -----------------------------------------------------------------------

# One chunked MQTT transfer being reassembled, unless the service asks for more (a node takes a
# release, so it passes MAX_RELEASE_PAYLOAD_BYTES).
MAX_TRANSFER_BYTES = 256 * _MIB
# All transfers one receiver is reassembling at once.
MAX_TRANSFERS_IN_FLIGHT_BYTES = 512 * _MIB
# A transfer larger than this is reassembled in a file in the service's spool folder
# (`<state>/spool`), not in memory; a ResNet-18 release (about 85 MiB) is one.
SPOOL_THRESHOLD_BYTES = 64 * _MIB
# The largest MQTT payload the broker takes when FEDERATION.toml does not say; chunks fit in it.
DEFAULT_MQTT_PACKET_BYTES = 2 * _MIB
# The range FEDERATION.toml's [broker] max_packet_bytes may take.
MIN_MQTT_PACKET_BYTES = 64 * _KIB
MAX_MQTT_PACKET_BYTES = 256 * _MIB
# MQTT header and topic on top of the largest payload, in the broker's and clients' packet limit.
MQTT_PACKET_OVERHEAD_BYTES = 64 * _KIB

# --- HTTP -------------------------------------------------------------------------------------

# A request body at a service's health/metrics server (tessera.observability.http) by default.
MAX_HTTP_BODY_BYTES = 32 * _MIB
# A DICOM body at `tessera node serve`'s POST /v1/infer: a large uncompressed CT slab still fits.
MAX_INFERENCE_BODY_BYTES = 256 * _MIB
# Connections served at once (a worker thread each; tessera.observability.http_server): more
# are closed on arrival, so a flood never costs more threads than this.
HTTP_MAX_WORKERS = 8  # a service's /healthz, /readyz, /metrics
INFERENCE_MAX_WORKERS = 8  # POST /v1/infer: each may hold one decoded image (the default)
MAX_INFERENCE_WORKERS = 64  # the most a site may configure

# --- DICOM intake (node.intake) ---------------------------------------------------------------

# Pixel data a DICOM header may declare; a larger image is quarantined, never decoded.
MAX_DECODED_IMAGE_BYTES = 1 * _GIB
# One DICOM file read by intake, or one object a PACS sends to the C-STORE receiver.
MAX_DICOM_OBJECT_BYTES = 2 * _GIB
# The C-STORE receiver's defaults (node.intake.receiver; a site changes them in [receiver]).
# One object: a larger one is cut off mid-transfer, before it is on disk whole.
RECEIVER_MAX_OBJECT_BYTES = 1 * _GIB
# Received objects waiting for the intake: beyond it, C-STOREs are refused (out of resources).
RECEIVER_QUOTA_BYTES = 4 * _GIB
# Associations at once; each may hold one object in flight in the temp folder (TMPDIR), so
# the disk a receiver can fill is the quota plus this times the object cap.
RECEIVER_MAX_ASSOCIATIONS = 4

# --- Releases asked for again (broker.topics FETCH and RELEASE_COPY) ---------------------------

# A node holding a release damaged on disk asks the aggregators for it at most this often, and
# an aggregator sends one node one version at most this often, so that a looping or hostile
# node cannot make an aggregator push a 45 MB model over and over.
RELEASE_REFETCH_INTERVAL_S = 60.0

# --- State folders (tessera.files: DiskWatch) -------------------------------------------------

# After a write found the disk full, a service resumes once this much is free, or what the
# failed write needed if that is more; SQLite does not say what it needed, so this covers a
# store's next transactions (its -wal and -shm files) with room to spare.
DISK_RESERVE_BYTES = 4 * _MIB
