"""`tessera node train`, `tessera node infer` and `tessera node serve`.

- `train`: one local training run over the preprocessed cache (optionally from a pretrained
  backbone, optionally with DP-SGD charged to the site's ledger); writes the weights
  (safetensors), the ONNX export and prints a JSON summary.
- `infer`: DICOM files or folders -> one JSON line per file on stdout (keyed instance hash,
  label, probabilities, model version; never a path or a patient identifier).
- `serve`: the HTTP endpoint; with `--watch`, a changed model file is hot-swapped in. It logs
  JSON lines on stderr (`--log-level`): what it serves, each swap, and each request with the
  model version that answered it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from tessera.observability.events import Event

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

log = logging.getLogger("tessera.node.inference")


def register(node_commands: Subparsers) -> None:
    """Add train, infer and serve under `tessera node`."""
    train = node_commands.add_parser("train", help="train locally on the preprocessed cache")
    train.add_argument("--state", type=Path, default=Path("/var/lib/tessera"))
    train.add_argument("--out", type=Path, required=True, help="folder for weights and ONNX")
    train.add_argument("--arch", default="small-cnn")
    train.add_argument("--norm", default="group", choices=("group", "batch"))
    train.add_argument("--size", type=int, default=64)
    train.add_argument("--channels", type=int, default=1, choices=(1, 3))
    train.add_argument("--window", default="file")
    train.add_argument("--frame", default="middle", choices=("middle", "first"))
    train.add_argument("--epochs", type=int, default=1)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--lr", type=float, default=0.05)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    train.add_argument("--backbone", type=Path, help="pretrained backbone (.safetensors or .pt)")
    train.add_argument("--transfer", default="full", choices=("head", "last-k", "full"))
    train.add_argument("--last-k", type=int, default=1)
    train.add_argument("--dp-noise", type=float, help="DP-SGD noise multiplier (enables DP)")
    train.add_argument("--dp-clip", type=float, default=1.0, help="per-sample gradient clip")
    train.add_argument("--dp-epsilon", type=float, default=4.0, help="this study's budget")
    train.add_argument("--dp-delta", type=float, default=1e-5)
    train.add_argument("--accountant", default="rdp", choices=("rdp", "prv"))
    train.add_argument("--study-id", default="local")
    train.add_argument("--round", type=int, default=1)
    train.add_argument("--version", default="local-1", help="version written into the export")
    train.set_defaults(handler=train_command)

    infer = node_commands.add_parser("infer", help="classify DICOM files, JSON lines out")
    infer.add_argument("--model", type=Path, required=True, help="Tessera ONNX file")
    infer.add_argument("--state", type=Path, default=Path("/var/lib/tessera"))
    infer.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    infer.add_argument("paths", nargs="+", type=Path)
    infer.set_defaults(handler=infer_command)

    serve = node_commands.add_parser("serve", help="serve POST /v1/infer")
    serve.add_argument("--model", type=Path, required=True)
    serve.add_argument("--state", type=Path, default=Path("/var/lib/tessera"))
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--watch", type=float, default=5.0, help="seconds between model checks")
    serve.add_argument("--log-level", default="INFO", help="JSON logs on stderr at this level")
    serve.set_defaults(handler=serve_command)


def train_command(args: argparse.Namespace) -> int:
    """Train on the cache, write weights and ONNX, print the summary."""
    from node.training.local import LocalRunConfig, run_local_training

    cfg = LocalRunConfig.from_args(args)
    summary = run_local_training(cfg)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def _dicom_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        else:
            files.append(path)
    return files


def infer_command(args: argparse.Namespace) -> int:
    """One JSON line per input file; exit 1 if any file was unusable."""
    from node.errors import UnusableImageError
    from node.inference.runtime import infer_dicom_bytes, load_model
    from node.intake.phi import keyed_hash, load_or_create_site_secret

    model = load_model(args.model.read_bytes(), threads=args.threads)
    secret = load_or_create_site_secret(args.state)
    failures = 0
    for path in _dicom_files(args.paths):
        try:
            result = infer_dicom_bytes(model, path.read_bytes(), secret)
        except UnusableImageError as error:
            failures += 1
            # The path may hold a patient's name: name it by keyed hash only.
            result = {"error": error.reason, "detail": error.detail,
                      "path_key": keyed_hash("path", str(path.resolve()), secret)}  # fmt: skip
        except OSError as error:
            failures += 1
            result = {"error": "unreadable", "detail": type(error).__name__,
                      "path_key": keyed_hash("path", str(path.resolve()), secret)}  # fmt: skip
        sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    sys.stdout.flush()
    return 1 if failures else 0


def serve_command(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM, hot-swapping the model when its file changes."""
    from node.errors import NodeError
    from node.inference.http import InferenceServer, ServeConfig
    from node.inference.runtime import ModelSlot, load_model
    from node.intake.phi import load_or_create_site_secret
    from tessera.observability.logs import configure_logging

    try:
        configure_logging(args.log_level)
    except ValueError as error:
        raise NodeError(str(error)) from None
    data = args.model.read_bytes()
    slot = ModelSlot(load_model(data))
    seen = hashlib.sha256(data).digest()
    server = InferenceServer(slot, load_or_create_site_secret(args.state),
                             ServeConfig(args.host, args.port))  # fmt: skip
    server.start()
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    fields = {"port": server.port, "model_version": slot.current().version}
    log.info(Event.SERVING, extra={"fields": fields})
    try:
        while not stop.wait(args.watch):
            try:
                data = args.model.read_bytes()
            except OSError:
                continue  # mid-replace; the next poll sees the new file
            digest = hashlib.sha256(data).digest()
            if digest == seen:
                continue
            try:
                new = load_model(data)
            except Exception as error:  # noqa: BLE001 - a bad file must not stop serving
                log.error(
                    Event.MODEL_UPDATE_REJECTED, extra={"fields": {"error": type(error).__name__}}
                )
                seen = digest
                continue
            slot.swap(new)
            seen = digest
            log.info(Event.SERVE_MODEL_SWAPPED, extra={"fields": {"model_version": new.version}})
    finally:
        server.shutdown()
    return 0
