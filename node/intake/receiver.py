"""DICOM C-STORE receiver (pynetdicom): lets a PACS push studies to the node.

Each received object is written, exactly as encoded by the sender, to
`<intake>/received/<instance_key>.dcm`: a temp file in the same folder, fsynced, then
renamed, so the intake scan never sees half an object (it also skips the temp prefix). The
file name is the keyed instance hash, never a UID or a patient name. The next intake pass
ingests it like any other file.

pynetdicom's own logger is silenced: at debug level it prints UIDs and dataset dumps.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.transport import ThreadedAssociationServer

from node.errors import NodeError
from node.intake.phi import instance_key, keyed_hash, load_or_create_site_secret
from node.intake.worker import TEMP_PREFIX
from tessera.limits import MAX_DICOM_OBJECT_BYTES
from tessera.observability.events import Event
from tessera.observability.logs import log_event

LOGGER = logging.getLogger("tessera.node.receiver")
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000


@dataclass(frozen=True)
class ReceiverConfig:
    """Where to listen and where received objects go."""

    intake_dir: Path
    state_dir: Path
    host: str = "0.0.0.0"  # noqa: S104 - a PACS on the hospital network must reach it
    port: int = 11112
    ae_title: str = "TESSERA"
    allowed_calling_aets: tuple[str, ...] = ()  # empty: accept any calling AE title
    max_object_bytes: int = MAX_DICOM_OBJECT_BYTES

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if not 1 <= len(self.ae_title) <= 16 or not self.ae_title.isascii():
            raise ValueError(f"AE title must be 1..16 ASCII characters, got {self.ae_title!r}")


def write_received(intake_dir: Path, name: str, data: bytes) -> Path:
    """Write `data` to `intake_dir/received/name` atomically; return the final path."""
    folder = intake_dir / "received"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    final = folder / name
    tmp = folder / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
    try:
        # Owner-only: a received object carries the patient's identity in full.
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)
    return final


def _handle_store(event: evt.Event, cfg: ReceiverConfig, secret: bytes) -> int:
    """Persist one C-STORE; answer with a DICOM status code."""
    try:
        data = event.encoded_dataset(include_meta=True)
    except Exception:  # noqa: BLE001 - a malformed request gets a status, not a crash
        log_event(LOGGER, Event.RECEIVER_UNREADABLE, logging.WARNING)
        return STATUS_CANNOT_UNDERSTAND
    if len(data) > cfg.max_object_bytes:
        log_event(LOGGER, Event.RECEIVER_TOO_LARGE, logging.WARNING, size=len(data))
        return STATUS_OUT_OF_RESOURCES
    sop = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
    key = (
        instance_key(sop, secret)
        if sop
        else keyed_hash("content", hashlib.sha256(data).hexdigest(), secret)
    )
    try:
        write_received(cfg.intake_dir, f"{key}.dcm", data)
    except OSError as error:
        log_event(LOGGER, Event.RECEIVER_WRITE_FAILED, logging.ERROR, instance=key,
                  error=type(error).__name__)  # fmt: skip
        return STATUS_OUT_OF_RESOURCES
    log_event(LOGGER, Event.RECEIVER_STORED, instance=key, size=len(data))
    return STATUS_SUCCESS


def _check_calling(event: evt.Event, cfg: ReceiverConfig) -> None:
    calling = event.assoc.requestor.ae_title.strip()
    log_event(LOGGER, Event.RECEIVER_ASSOCIATION, calling_aet=calling)
    if cfg.allowed_calling_aets and calling not in cfg.allowed_calling_aets:
        log_event(LOGGER, Event.RECEIVER_REJECTED, logging.WARNING, calling_aet=calling)
        event.assoc.abort()


def build_ae(cfg: ReceiverConfig) -> AE:
    """An Application Entity accepting every storage SOP class in every transfer syntax."""
    logging.getLogger("pynetdicom").disabled = True
    ae = AE(ae_title=cfg.ae_title)
    ae.require_called_aet = True
    for context in AllStoragePresentationContexts:
        if context.abstract_syntax is not None:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context("1.2.840.10008.1.1")  # Verification (C-ECHO)
    return ae


def start_receiver(cfg: ReceiverConfig) -> ThreadedAssociationServer:
    """Start listening in the background; call `.shutdown()` on the result to stop."""
    secret = load_or_create_site_secret(cfg.state_dir)
    cfg.intake_dir.mkdir(parents=True, exist_ok=True)
    handlers: list[Any] = [
        (evt.EVT_C_STORE, _handle_store, [cfg, secret]),
        (evt.EVT_ACCEPTED, _check_calling, [cfg]),
    ]
    server = build_ae(cfg).start_server((cfg.host, cfg.port), block=False, evt_handlers=handlers)
    if not isinstance(server, ThreadedAssociationServer):
        raise NodeError(f"C-STORE receiver did not start on {cfg.host}:{cfg.port}")
    log_event(LOGGER, Event.RECEIVER_LISTENING, host=cfg.host, port=server.server_address[1],
              ae_title=cfg.ae_title)  # fmt: skip
    return server
