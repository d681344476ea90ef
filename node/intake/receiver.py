"""DICOM C-STORE receiver (pynetdicom): lets a PACS push studies to the node.

Who may push, decided at association (a refusal is an A-ASSOCIATE-RJ, logged with its
reason only: what a refused peer sent is never written anywhere):

- only the calling AE titles on the allow-list (pynetdicom's `require_calling_aet`; a
  receiver without one does not start), calling the node's own AE title;
- optionally, only from the allowed networks (checked when the request arrives, before
  anything is negotiated);
- over DICOM TLS when configured (`ReceiverTLS`): AEAD suites, TLS 1.2 or later, and with a
  client CA a certificate from every sender. The handshake runs in the association's own
  thread, so a peer that connects and says nothing holds up nobody else;
- only the image storage SOP classes (`IMAGE_STORAGE_CLASSES`) are negotiated: an RT plan,
  a structured report or a waveform gets no presentation context, so it is never sent.

What is kept (`node.intake.receiver_store`): each object streams into a temp file in the
temp folder (TMPDIR; pynetdicom's `STORE_RECV_CHUNKED_DATASET`), never whole in memory,
and an object is cut off (A-ABORT) as soon as it passes `max_object_bytes`, its partial
file deleted. Accepted objects land in `<state>/received/<instance_key>.dcm` (owner-only,
named by the keyed instance hash, never replaced), under a quota; the intake deletes each
once it is cached or quarantined (`node.intake.ingest`).

Nothing of pynetdicom's or pydicom's logging reaches an output at any level
(`tessera.observability.logs.silence_dicom_libraries`): at DEBUG pynetdicom dumps every
message, UIDs included.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import config as pydicom_config
from pydicom.uid import UID
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.transport import ThreadedAssociationServer

from node.errors import NodeError
from node.intake.receiver_store import (
    RECEIVED_DIR,
    STATUS_CANNOT_UNDERSTAND,
    Arrival,
    ReceivedObjects,
)
from tessera.errors import ConfigError
from tessera.limits import (
    MAX_DICOM_OBJECT_BYTES,
    RECEIVER_MAX_ASSOCIATIONS,
    RECEIVER_MAX_OBJECT_BYTES,
    RECEIVER_QUOTA_BYTES,
)
from tessera.observability.events import Event
from tessera.observability.logs import log_event, silence_dicom_libraries

LOGGER = logging.getLogger("tessera.node.receiver")
VERIFICATION = "1.2.840.10008.1.1"  # C-ECHO
# The storage classes that carry an image, the only ones the intake can train on.
IMAGE_STORAGE_CLASSES = frozenset(
    str(context.abstract_syntax)
    for context in AllStoragePresentationContexts
    if context.abstract_syntax is not None and "Image Storage" in UID(context.abstract_syntax).name
)
# Fewer, larger PDUs than pynetdicom's 16 KiB default; each is held once while it is written.
MAX_PDU_BYTES = 256 * 1024
NetworkType = ipaddress.IPv4Network | ipaddress.IPv6Network
# (result source, diagnostic) of an A-ASSOCIATE-RJ, as the reason logged for it
_REJECTIONS = {(1, 3): "calling-aet", (1, 7): "called-aet", (3, 2): "busy"}


@dataclass(frozen=True)
class ReceiverTLS:
    """DICOM TLS: the receiver's certificate and key (PEM); with `client_ca_file`, every
    sender must present a certificate signed by that CA (mutual TLS)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    def context(self) -> ssl.SSLContext:
        """The server's TLS context; ConfigError naming the file that does not load."""
        context = _DeferredHandshake(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")  # TLS 1.2: forward secrecy, AEAD
        try:
            context.load_cert_chain(self.cert_file, self.key_file)
            if self.client_ca_file is not None:
                context.load_verify_locations(self.client_ca_file)
                context.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as error:
            raise ConfigError(
                f"the receiver's TLS files do not load ({error}); check [receiver] tls_cert, "
                "tls_key and tls_client_ca: PEM files readable by the node"
            ) from None
        return context


class _DeferredHandshake(ssl.SSLContext):
    """Wraps accepted sockets without handshaking. pynetdicom wraps them in its accept loop,
    where a peer that never completes a handshake would stop every other connection; the
    handshake then happens on the association thread's first read."""

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(*args, **kwargs)


@dataclass(frozen=True)
class ReceiverConfig:
    """Who may push, where it goes and how much the receiver keeps (module docstring)."""

    state_dir: Path
    allowed_calling_aets: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 11112
    ae_title: str = "TESSERA"
    allowed_networks: tuple[str, ...] = ()  # addresses or CIDR blocks; empty: any address
    tls: ReceiverTLS | None = None
    max_object_bytes: int = RECEIVER_MAX_OBJECT_BYTES
    quota_bytes: int = RECEIVER_QUOTA_BYTES
    max_associations: int = RECEIVER_MAX_ASSOCIATIONS
    audit_log: Path | None = None  # where refused replacements are recorded

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if not is_ae_title(self.ae_title):
            raise ValueError(f"AE title must be 1..16 ASCII characters, got {self.ae_title!r}")
        if not self.allowed_calling_aets:
            raise ValueError(
                "allowed_calling_aets is empty: the receiver accepts only the calling AE "
                "titles it lists; name the PACS that may push (e.g. PACS1)"
            )
        bad = [t for t in self.allowed_calling_aets if not is_ae_title(t)]
        if bad:
            raise ValueError(f"allowed_calling_aets: {bad[0]!r} is not an AE title (1-16 ASCII)")
        self.networks()  # raises on a malformed block
        if not 1 <= self.max_object_bytes <= MAX_DICOM_OBJECT_BYTES:
            raise ValueError(
                f"max_object_bytes must be 1..{MAX_DICOM_OBJECT_BYTES}, got {self.max_object_bytes}"
            )
        if self.quota_bytes < 1:
            raise ValueError(f"quota_bytes must be positive, got {self.quota_bytes}")
        if not 1 <= self.max_associations <= 64:
            raise ValueError(f"max_associations must be 1..64, got {self.max_associations}")

    def networks(self) -> tuple[NetworkType, ...]:
        """The allowed source networks (empty: any); ValueError naming a malformed one."""
        try:
            return tuple(ipaddress.ip_network(n, strict=False) for n in self.allowed_networks)
        except ValueError as error:
            raise ValueError(
                f"allowed_networks: {error}; use addresses or CIDR blocks (10.0.5.0/24)"
            ) from None


def is_ae_title(title: str) -> bool:
    """Whether `title` can be an AE title: 1-16 printable ASCII characters, no backslash."""
    plain = title.isascii() and title.isprintable() and "\\" not in title
    return plain and 1 <= len(title.strip()) <= 16


class _AssociationGuard:
    """The association-level checks and the per-association size cap (module docstring)."""

    def __init__(self, cfg: ReceiverConfig) -> None:
        self.networks = cfg.networks()
        self.limit = cfg.max_object_bytes
        self._lock = threading.Lock()
        self._in_flight: dict[Association, int] = {}  # dataset bytes of the current message

    def check_address(self, event: evt.Event) -> None:
        """EVT_REQUESTED: reject a peer outside the allowed networks before negotiating."""
        if not self.networks:
            return
        address = ipaddress.ip_address(event.assoc.requestor.address)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # an IPv4 peer of a dual-stack socket
        if not any(address in network for network in self.networks):
            log_event(LOGGER, Event.RECEIVER_REJECTED, logging.WARNING, reason="address")
            event.assoc.acse.send_reject(0x01, 0x01, 0x01)  # permanent, service user
            event.assoc.kill()

    def log_rejection(self, event: evt.Event) -> None:
        """EVT_REJECTED: pynetdicom's own rejections (AE titles, too many associations)."""
        answer = event.assoc.acceptor.primitive
        cause = (getattr(answer, "result_source", 0), getattr(answer, "diagnostic", 0))
        log_event(LOGGER, Event.RECEIVER_REJECTED, logging.WARNING,
                  reason=_REJECTIONS.get(cause, "other"))  # fmt: skip

    def log_acceptance(self, event: evt.Event) -> None:
        """EVT_ACCEPTED: the (allowed) calling AE title, and the classes it may not send."""
        log_event(LOGGER, Event.RECEIVER_ASSOCIATION,
                  calling_aet=event.assoc.requestor.ae_title.strip())  # fmt: skip
        refused = sorted({_class_name(c.abstract_syntax) for c in event.assoc.rejected_contexts})
        if refused:
            log_event(LOGGER, Event.RECEIVER_CLASSES_REFUSED, logging.WARNING, classes=refused)

    def count(self, event: evt.Event) -> None:
        """EVT_PDU_RECV: add up the dataset bytes of the message in flight; past the cap,
        abort the association (its partial file is deleted when the connection closes)."""
        pdu = event.pdu
        if not isinstance(pdu, P_DATA_TF):
            return
        assoc = event.assoc
        with self._lock:
            size = self._in_flight.get(assoc, 0)
            if size < 0:
                return  # already cut off
            for item in pdu.presentation_data_value_items:
                value = item.presentation_data_value or b"\x00"
                if value[0] & 1:
                    continue  # a command fragment
                size += len(value) - 1
                if size > self.limit:
                    self._in_flight[assoc] = -1
                    log_event(LOGGER, Event.RECEIVER_TOO_LARGE, logging.WARNING, size=size,
                              limit=self.limit)  # fmt: skip
                    assoc.abort()
                    return
                if value[0] & 2:
                    size = 0  # the message's last fragment
            self._in_flight[assoc] = size

    def forget(self, event: evt.Event) -> None:
        """EVT_CONN_CLOSE: drop the association's count and any object cut off mid-way
        (pynetdicom deletes a temp file only after its C-STORE handler has run)."""
        with self._lock:
            self._in_flight.pop(event.assoc, None)
        message = getattr(event.assoc.dimse, "message", None)
        partial = getattr(message, "_data_set_file", None)  # written by this same thread
        if partial is not None:
            partial.close()
            Path(partial.name).unlink(missing_ok=True)


def _class_name(uid: str | None) -> str:
    """A storage class's keyword (standard vocabulary, never a peer's free text)."""
    keyword = UID(uid or "").keyword
    return keyword or "unknown"


def _handle_store(event: evt.Event, objects: ReceivedObjects) -> int:
    """EVT_C_STORE: keep the streamed object, or refuse it; the DICOM status."""
    request = event.request
    try:
        path = Path(event.dataset_path)
    except AttributeError:
        return STATUS_CANNOT_UNDERSTAND
    if not isinstance(request, C_STORE):
        return STATUS_CANNOT_UNDERSTAND
    return objects.keep(
        Arrival(
            path=path,
            sop_class_uid=str(request.AffectedSOPClassUID or ""),
            sop_instance_uid=str(request.AffectedSOPInstanceUID or ""),
            calling_aet=event.assoc.requestor.ae_title.strip(),
        )
    )


def build_ae(cfg: ReceiverConfig) -> AE:
    """An Application Entity for the image storage classes, in every transfer syntax, that
    only the allowed calling AE titles may call, and that streams objects to disk.

    Sets pynetdicom's and pydicom's process-wide switches: objects received to temp files,
    no identifiers in pynetdicom's handlers, no reading validation (its warnings quote
    values), and both libraries' logging silenced.
    """
    silence_dicom_libraries()
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.LOG_HANDLER_LEVEL = "none"
    _config.LOG_REQUEST_IDENTIFIERS = _config.LOG_RESPONSE_IDENTIFIERS = False
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    ae = AE(ae_title=cfg.ae_title)
    ae.require_called_aet = True
    ae.require_calling_aet = list(cfg.allowed_calling_aets)
    ae.maximum_associations = cfg.max_associations
    ae.maximum_pdu_size = MAX_PDU_BYTES
    for uid in sorted(IMAGE_STORAGE_CLASSES):
        ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(VERIFICATION)
    return ae


def start_receiver(cfg: ReceiverConfig) -> ThreadedAssociationServer:
    """Start listening in the background; call `.shutdown()` on the result to stop."""
    objects = ReceivedObjects(cfg.state_dir, cfg.quota_bytes, IMAGE_STORAGE_CLASSES, cfg.audit_log)
    guard = _AssociationGuard(cfg)
    handlers: list[Any] = [
        (evt.EVT_REQUESTED, guard.check_address),
        (evt.EVT_REJECTED, guard.log_rejection),
        (evt.EVT_ACCEPTED, guard.log_acceptance),
        (evt.EVT_PDU_RECV, guard.count),
        (evt.EVT_CONN_CLOSE, guard.forget),
        (evt.EVT_C_STORE, _handle_store, [objects]),
    ]
    context = cfg.tls.context() if cfg.tls is not None else None
    server = build_ae(cfg).start_server(
        (cfg.host, cfg.port), block=False, evt_handlers=handlers, ssl_context=context
    )
    if not isinstance(server, ThreadedAssociationServer):
        raise NodeError(f"C-STORE receiver did not start on {cfg.host}:{cfg.port}")
    log_event(LOGGER, Event.RECEIVER_LISTENING, host=cfg.host, port=server.server_address[1],
              ae_title=cfg.ae_title)  # fmt: skip
    return server


__all__ = ["RECEIVED_DIR", "ReceiverConfig", "ReceiverTLS", "build_ae", "start_receiver"]
