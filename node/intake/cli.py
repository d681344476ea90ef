"""`tessera node ingest`, `tessera node receive` and `tessera synth`.

pydicom, pynetdicom and numpy are imported inside the handlers, so that `tessera --help`
and the other packages' commands start fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from tessera.errors import ConfigError
from tessera.limits import MAX_DECODED_IMAGE_BYTES, RECEIVER_MAX_OBJECT_BYTES, RECEIVER_QUOTA_BYTES

if TYPE_CHECKING:
    from node.intake.ingest import IntakeConfig

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

MODALITIES = ("mixed", "ct", "cr", "dx")


def register(node_commands: Subparsers) -> None:
    """Add `ingest` and `receive` under `tessera node`."""
    ingest = node_commands.add_parser("ingest", help="ingest the DICOM intake folder")
    _common(ingest)
    ingest.add_argument(
        "--labels",
        type=Path,
        help="labels CSV (label, split and one key "
        "column: sop_instance_uid, study_instance_uid or accession_number)",
    )
    ingest.add_argument("--label-set", help="the study's labels, comma separated")
    ingest.add_argument(
        "--folder-labels",
        action="store_true",
        help="take the label from each file's top-level folder",
    )
    ingest.add_argument("--size", type=int, default=64, help="model input side in pixels")
    ingest.add_argument("--channels", type=int, default=1, choices=(1, 3))
    ingest.add_argument(
        "--window",
        default="file",
        help="file | minmax | ct-soft-tissue | ct-lung | ... | CENTER/WIDTH",
    )
    ingest.add_argument("--frame", default="middle", choices=("middle", "first"))
    ingest.add_argument("--workers", type=int, default=2)
    ingest.add_argument(
        "--max-decoded-bytes",
        type=int,
        default=MAX_DECODED_IMAGE_BYTES,
        help="quarantine images whose header declares more decoded bytes",
    )
    ingest.add_argument(
        "--watch",
        type=float,
        metavar="SECONDS",
        help="keep rescanning every SECONDS until interrupted",
    )
    ingest.add_argument("--report", action="store_true", help="print a summary afterwards")
    ingest.add_argument("--report-only", action="store_true", help="summarise without scanning")
    ingest.add_argument("--json", action="store_true", help="print the report as JSON")
    ingest.add_argument(
        "--show-paths",
        action="store_true",
        help="list quarantined files by path (terminal only; never logged)",
    )
    ingest.add_argument(
        "--keep-received-hours",
        type=float,
        default=0.0,
        help="delete each object in <state>/received this long after it is cached (default 0)",
    )
    ingest.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    ingest.set_defaults(handler=ingest_command)  # fmt: skip

    receive = node_commands.add_parser(
        "receive", help="run the DICOM C-STORE receiver (objects go to <state>/received)"
    )
    receive.add_argument("--state", type=Path, default=Path("/var/lib/tessera"))
    receive.add_argument("--host", default="127.0.0.1", help="listen address (default loopback)")
    receive.add_argument("--port", type=int, default=11112)
    receive.add_argument("--ae-title", default="TESSERA")
    receive.add_argument(
        "--allow-aet",
        action="append",
        default=[],
        required=True,
        help="accept this calling AE title (repeatable; at least one)",
    )
    receive.add_argument(
        "--allow-address",
        action="append",
        default=[],
        help="accept only from this address or CIDR block (repeatable; default any)",
    )
    receive.add_argument("--tls-cert", type=Path, help="DICOM TLS: the receiver's certificate")
    receive.add_argument("--tls-key", type=Path, help="DICOM TLS: its private key")
    receive.add_argument("--tls-client-ca", type=Path, help="require client certificates")
    receive.add_argument("--max-object-mib", type=int, default=RECEIVER_MAX_OBJECT_BYTES >> 20)
    receive.add_argument("--quota-mib", type=int, default=RECEIVER_QUOTA_BYTES >> 20)
    receive.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    receive.set_defaults(handler=receive_command)  # fmt: skip


def register_synth(commands: Subparsers) -> None:
    """Add `tessera synth`."""
    synth = commands.add_parser("synth", help="write synthetic hospitals' DICOM")
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--sites", type=int, default=3)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--images-per-site", type=int, default=200)
    synth.add_argument(
        "--skew",
        type=float,
        default=0.5,
        help="label skew across sites: 0 = IID, 1 = prevalence 0.1..0.9",
    )
    synth.add_argument("--modality", default="mixed", choices=MODALITIES)
    synth.add_argument("--size", type=int, default=64, help="written image width in pixels")
    synth.add_argument("--test-fraction", type=float, default=0.2)
    synth.set_defaults(handler=synth_command)  # fmt: skip


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--intake", type=Path, default=Path("/data/dicom"))
    parser.add_argument("--state", type=Path, default=Path("/var/lib/tessera"))


def intake_config(args: argparse.Namespace) -> IntakeConfig:
    """The IntakeConfig that `tessera node ingest`'s arguments describe."""
    from node.intake.ingest import IntakeConfig
    from node.intake.preprocess import PreprocessConfig
    from node.intake.screen import IntakeLimits

    label_set = tuple(x.strip() for x in args.label_set.split(",")) if args.label_set else None
    return IntakeConfig(
        intake_dir=args.intake,
        state_dir=args.state,
        received_dir=args.state / "received",
        received_retention_s=args.keep_received_hours * 3600,
        preprocess=PreprocessConfig(size=args.size, channels=args.channels, window=args.window,
                                    frame=args.frame),
        limits=IntakeLimits(max_decoded_bytes=args.max_decoded_bytes),
        label_set=label_set,
        labels_csv=args.labels,
        folder_labels=args.folder_labels,
        workers=args.workers,
    )  # fmt: skip


def ingest_command(args: argparse.Namespace) -> int:
    """Run one intake pass (or keep watching), then optionally report."""
    from node.intake.ingest import run_ingest
    from node.intake.report import build_report, format_report, quarantined_paths
    from tessera.observability.logs import configure_logging

    with _config_errors():
        configure_logging(args.log_level)
        cfg = intake_config(args)
    if not args.report_only:
        stop = _stop_event()
        while True:
            run_ingest(cfg)
            if args.watch is None or stop.wait(args.watch):
                break
    if args.report or args.report_only:
        report = build_report(cfg.state_dir, cfg.preprocess.digest())
        print(json.dumps(report, indent=2) if args.json else format_report(report))
    if args.show_paths:
        for relative, reason, detail in quarantined_paths(cfg):
            print(f"{reason}\t{relative}\t{detail}")
    return 0


def receive_command(args: argparse.Namespace) -> int:
    """Serve C-STORE until SIGINT or SIGTERM."""
    from node.intake.receiver import ReceiverConfig, ReceiverTLS, start_receiver
    from tessera.observability.logs import configure_logging

    with _config_errors():
        configure_logging(args.log_level)
        if (args.tls_cert is None) != (args.tls_key is None):
            raise ValueError("DICOM TLS needs both --tls-cert and --tls-key")
        tls = None
        if args.tls_cert is not None:
            tls = ReceiverTLS(args.tls_cert, args.tls_key, args.tls_client_ca)
        cfg = ReceiverConfig(
            state_dir=args.state,
            allowed_calling_aets=tuple(args.allow_aet),
            host=args.host,
            port=args.port,
            ae_title=args.ae_title,
            allowed_networks=tuple(args.allow_address),
            tls=tls,
            max_object_bytes=args.max_object_mib << 20,
            quota_bytes=args.quota_mib << 20,
            audit_log=args.state / "audit.log",  # the node's (node.setup.AUDIT_FILE)
        )
    server = start_receiver(cfg)
    try:
        _stop_event().wait()
    finally:
        server.shutdown()
    return 0


def synth_command(args: argparse.Namespace) -> int:
    """Write the synthetic hospitals and print the summary path."""
    from node.synth.sites import SynthConfig, generate

    with _config_errors():
        cfg = SynthConfig(out=args.out, sites=args.sites, seed=args.seed,
                          images_per_site=args.images_per_site, skew=args.skew,
                          modality=args.modality, size=args.size,
                          test_fraction=args.test_fraction)  # fmt: skip
    generate(cfg)
    print(cfg.out / "synth.json")
    return 0


@contextlib.contextmanager
def _config_errors() -> Iterator[None]:
    """Turn a config dataclass's ValueError into ConfigError: one line, exit status 2."""
    try:
        yield
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _stop_event() -> threading.Event:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    return stop
