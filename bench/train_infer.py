"""Training and inference throughput, as ratios to baselines measured in the same run.

Run: .venv/bin/python bench/train_infer.py [--record] [--size 64] [--quick]

1. Inference latency at batch 1, per architecture (GroupNorm variants, the federated
   default): onnxruntime (the node's tuned session: intra-op threads = cores, sequential)
   over torch eager under `inference_mode` with the same thread count. p50 and p99 of each,
   and their ratios. Target: ORT / torch <= 0.6.
2. End to end: DICOM bytes -> screen, decode, preprocess (the intake's code) -> ORT ->
   JSON-ready result; p50 for pydicom's CT_small.dcm. Recorded, no target.
3. Training images/s of `node.training.trainer.run_local_round` over a bare PyTorch loop
   (same model, data, batch size, SGD and step count). Target >= 0.95.
4. DP-SGD (Opacus, Poisson sampling) images/s against the plain trainer: the slowdown.

Runs alternate between the candidate and its baseline, and the median of the repeats is
reported, so that load from other processes on a shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.inference.runtime import infer_dicom_bytes, load_model, preprocess_metadata
from node.intake.preprocess import PreprocessConfig
from node.privacy.ledger import PrivacyLedger
from node.training.trainer import DPSettings, TrainConfig, run_local_round
from tessera.models import ARCHITECTURES, ModelSpec, build_model
from tessera.models.onnx_export import ExportMetadata, export_onnx

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## train_infer (`bench/train_infer.py`)"
CORES = len(os.sched_getaffinity(0))


def percentiles(samples: list[float]) -> tuple[float, float]:
    """(p50, p99) in milliseconds."""
    values = np.asarray(samples) * 1e3
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


def latency(arch: str, size: int, iterations: int) -> tuple[list[str], bytes]:
    """ORT vs torch eager at batch 1; returns report lines and the ONNX bytes."""
    spec = ModelSpec(arch, 1, 2, "group")
    model = build_model(spec).eval()
    meta = ExportMetadata(spec.model_id, "bench", "0" * 64, ("absent", "present"),
                          preprocess_metadata(PreprocessConfig(size=size)))  # fmt: skip
    data = export_onnx(model, meta, size)
    session = load_model(data)
    x = np.random.default_rng(0).standard_normal((1, 1, size, size)).astype(np.float32)
    xt = torch.from_numpy(x)
    ort_times: list[float] = []
    torch_times: list[float] = []
    with torch.inference_mode():
        for _ in range(10):  # warm-up both
            model(xt)
            session.probabilities(x)
        for _ in range(iterations):
            start = time.perf_counter()
            session.probabilities(x)
            ort_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            torch.softmax(model(xt), dim=1)
            torch_times.append(time.perf_counter() - start)
    (o50, o99), (t50, t99) = percentiles(ort_times), percentiles(torch_times)
    line = (f"{arch:13s} torch p50 {t50:7.2f} ms p99 {t99:7.2f} | ort p50 {o50:7.2f} ms "
            f"p99 {o99:7.2f} | ratio p50 {o50 / t50:.2f} p99 {o99 / t99:.2f}")  # fmt: skip
    return [line], data


def end_to_end(data: bytes, iterations: int) -> str:
    """p50 of DICOM bytes -> prediction for pydicom's CT_small.dcm."""
    from pydicom.data import get_testdata_file

    dicom = Path(str(get_testdata_file("CT_small.dcm"))).read_bytes()
    model = load_model(data)
    secret = os.urandom(32)
    times = []
    for i in range(iterations + 5):
        start = time.perf_counter()
        infer_dicom_bytes(model, dicom, secret)
        if i >= 5:
            times.append(time.perf_counter() - start)
    p50, p99 = percentiles(times)
    name = model.metadata.model_id
    return f"end-to-end CT_small.dcm -> prediction ({name}): p50 {p50:.2f} ms p99 {p99:.2f} ms"


def bare_loop(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, steps: int,
              lr: float) -> float:  # fmt: skip
    """The baseline: the plainest correct PyTorch SGD loop. Returns images/s."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    order = torch.randperm(len(x), generator=generator)
    cursor = 0
    for _ in range(steps):
        if cursor >= len(x):
            order, cursor = torch.randperm(len(x), generator=generator), 0
        idx = order[cursor : cursor + batch]
        cursor += batch
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * batch / (time.perf_counter() - start)


def training(arch: str, size: int, repeats: int, steps: int, ledger_dir: Path) -> list[str]:
    """Trainer vs bare loop, and DP-SGD vs the trainer, images/s (medians)."""
    spec = ModelSpec(arch, 1, 2, "group")
    rng = np.random.default_rng(0)
    n, batch = 320, 32
    # n / (1 - validation) train images; 256 train + 64 validation.
    images = rng.standard_normal((n, 1, size, size)).astype(np.float32)
    labels = rng.integers(0, 2, n)
    plain_cfg = TrainConfig(local_steps=steps, batch_size=batch, learning_rate=0.01,
                            device="cpu")  # fmt: skip
    # Opacus is much slower per step; fewer steps keep the run short (images/s is per step).
    dp_cfg = TrainConfig(local_steps=max(2, steps // 3), batch_size=batch, learning_rate=0.01,
                         device="cpu", dp=DPSettings(1.0, 1.0))  # fmt: skip
    xt = torch.from_numpy(images[: n - 64])
    yt = torch.from_numpy(labels[: n - 64])
    bare_loop(build_model(spec), xt, yt, batch, 2, 0.01)  # warm-up: allocator, kernels
    bare, ours, private = [], [], []
    for r in range(repeats):
        # Alternate which goes first, so neither always runs on a warmer cache.
        pair = [lambda: bare.append(bare_loop(build_model(spec), xt, yt, batch, steps, 0.01)),
                lambda: ours.append(run_local_round(build_model(spec), images, labels,
                                                    plain_cfg).images_per_second)]  # fmt: skip
        for run in pair if r % 2 == 0 else pair[::-1]:
            run()
        ledger = PrivacyLedger(ledger_dir / f"{arch}-{r}.json", "bench", 1e9, 1e-5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = run_local_round(build_model(spec), images, labels, dp_cfg, ledger, r + 1)
        private.append(result.images_per_second)
    b, o, p = (statistics.median(v) for v in (bare, ours, private))
    return [f"{arch:13s} bare {b:8.1f} img/s | trainer {o:8.1f} img/s | ratio {o / b:.3f} "
            f"| DP-SGD {p:8.1f} img/s | DP slowdown {o / p:.2f}x"]  # fmt: skip


def main() -> None:
    """Run every section, print it, optionally record it in bench/RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--iterations", type=int, default=200, help="latency samples")
    parser.add_argument("--repeats", type=int, default=3, help="training repeats (median)")
    parser.add_argument("--steps", type=int, default=10, help="training steps per repeat")
    parser.add_argument("--record", action="store_true", help="update bench/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(CORES)
    lines = [f"cores {CORES}, image {args.size}x{args.size}x1, GroupNorm variants, "
             f"torch {torch.__version__}"]  # fmt: skip
    lines.append("-- inference latency, batch 1 (target: ORT/torch <= 0.6)")
    exports = {}
    for arch in ARCHITECTURES:
        report, exports[arch] = latency(arch, args.size, args.iterations)
        lines += report
        print(lines[-1], flush=True)
    lines.append("-- end to end")
    for arch in ("small-cnn", "mobilenet-v2"):
        lines.append(end_to_end(exports[arch], max(50, args.iterations // 4)))
        print(lines[-1], flush=True)
    lines.append("-- training, batch 32, SGD (target: trainer/bare >= 0.95)")
    import tempfile

    with tempfile.TemporaryDirectory() as ledger_dir:
        for arch in ("small-cnn", "mobilenet-v2"):
            lines += training(arch, args.size, args.repeats, args.steps, Path(ledger_dir))
            print(lines[-1], flush=True)
    if args.record:
        record(lines, sys.argv[1:])


def record(lines: list[str], argv: list[str]) -> None:
    """Replace only this benchmark's section of bench/RESULTS.md."""
    text = RESULTS.read_text()
    start = text.index(SECTION) + len(SECTION)
    end = text.find("\n## ", start)
    end = len(text) if end == -1 else end
    when = time.strftime("%Y-%m-%d", time.gmtime())
    command = " ".join([".venv/bin/python bench/train_infer.py", *argv])
    body = f"\n\nCommand: `{command}` ({when})\n\n```\n" + "\n".join(lines) + "\n```\n"
    RESULTS.write_text(text[:start] + body + text[end:])


if __name__ == "__main__":
    main()
