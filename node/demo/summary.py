"""The demo's closing summary, once the federation has stopped.

`summarise_run` trains the centralised and local-only baselines (`node.demo.report`), prints
the per-site table, the wire, the privacy spent and the strategy switches, plots the learning
curves, exports the final model and runs point-of-care inference with it
(`node.demo.point_of_care`), and returns the report that `run_demo` writes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from node.config import TrainingSettings
from node.demo.federation import PreparedFederation
from node.demo.options import DemoOptions
from node.demo.point_of_care import export_final_model, infer_held_out
from node.demo.progress import Progress
from node.demo.report import (
    BaselinePlan,
    RunRecord,
    Score,
    baselines,
    load_site_data,
    mean,
    plot_curves,
)


def summarise_run(
    opts: DemoOptions,
    out: Path,
    prepared: PreparedFederation,
    record: RunRecord,
    curve: list[tuple[int, dict[str, Score]]],
    show: Progress,
) -> dict[str, object]:
    """Baselines, the printed summary, the plot, the final model and inference; the report."""
    from node.round.releases import open_model_store
    from node.setup import study_preprocess

    spec = prepared.spec
    study = prepared.study()
    model_def = prepared.study_model()
    preprocess = study_preprocess(model_def)
    data = [load_site_data(s, prepared.state(s), preprocess) for s in spec.sites]
    plan = BaselinePlan(
        epochs=max(1, len(curve)) * opts.local_epochs,
        batch_size=opts.batch_size,
        learning_rate=opts.learning_rate,
        noise_multiplier=opts.noise_multiplier,
        max_grad_norm=TrainingSettings().max_grad_norm,  # the nodes': the demo keeps the default
        seed=opts.seed,
    )
    work = out / "baselines"
    work.mkdir()
    central, local = baselines(model_def, data, plan, work)
    final = curve[-1][1] if curve else {}
    show.say("")
    for line in score_lines({d.site: len(d.test_y) for d in data}, final, central, local, record):
        show.say(line)
    show.say(
        "Epsilon spent per site (DP-SGD, RDP accountant, delta "
        f"{study.dp.delta:g}): "
        + (", ".join(f"{s} {e:.2f}" for s, e in sorted(record.epsilon.items())) or "none")
    )
    if record.switches:
        for switch in record.switches:
            show.say(f"Strategy switch: {switch}")
    elif record.rounds:
        show.say(
            f"Strategy switches: none (the adaptive policy kept {record.rounds[-1]['algorithm']})"
        )
    else:
        show.say("Strategy switches: none (no model was released)")
    files = {}
    if curve:
        plot_curves(out / "learning-curves.png", curve, central, local)
        files["plot"] = str(out / "learning-curves.png")
        files.update(
            export_final_model(out, prepared, open_model_store(prepared.state(spec.sites[0])))
        )
        show.say(f"Learning curves: {files['plot']}")
        show.say(
            f"Final signed model: {files['onnx']} (release with both signatures: "
            f"{files['release']})"
        )
        show.say("6/6 point-of-care inference on held-out DICOM files with that ONNX model:")
        files["inference"] = infer_held_out(out, prepared, Path(files["onnx"]), show)
    return {
        "options": {k: str(v) for k, v in vars(opts).items()},
        "rounds": record.rounds,
        "aborts": record.aborts,
        "joined": record.joined,
        "epsilon": record.epsilon,
        "switches": record.switches,
        "bytes_sent": record.bytes_sent,
        "plaintext_bytes": record.plaintext_bytes,
        "federated": {s: vars(v) for s, v in final.items()},
        "centralised": {s: vars(v) for s, v in central.items()},
        "local_only": {s: vars(v) for s, v in local.items()},
        "files": files,
    }


def _cell(score: Score | None) -> str:
    """`accuracy / AUC`, with "-" for what was not measured (no release, one class only)."""
    if score is None:
        return "-"
    return " / ".join("-" if math.isnan(v) else f"{v:.3f}" for v in (score.accuracy, score.auc))


def _mean(scores: Mapping[str, Score]) -> Score | None:
    return Score(mean(scores, "accuracy"), mean(scores, "auc")) if scores else None


def score_lines(
    test_sizes: Mapping[str, int],
    final: Mapping[str, Score],
    central: Mapping[str, Score],
    local: Mapping[str, Score],
    record: RunRecord,
) -> list[str]:
    """The per-site held-out table and the wire line. Where no model was released, or no
    node sent a share, a sentence says so and why (never a NaN)."""
    lines = [
        "Held-out accuracy / AUC per site",
        f"  {'site':8} {'test n':>6}  {'federated':>15}  {'centralised':>15}  {'local-only':>15}",
    ]
    for site, size in test_sizes.items():
        cells = (_cell(final.get(site)), _cell(central.get(site)), _cell(local.get(site)))
        lines.append(f"  {site:8} {size:>6}  " + "  ".join(f"{c:>15}" for c in cells))
    cells = (_cell(_mean(final)), _cell(_mean(central)), _cell(_mean(local)))
    lines.append(f"  {'mean':8} {'':>6}  " + "  ".join(f"{c:>15}" for c in cells))
    if not final:
        reasons = sorted({str(a.get("reason")) for a in record.aborts})
        why = (
            f"{len(record.aborts)} round(s) aborted ({'; '.join(reasons)})"
            if record.aborts
            else "no round ended in time"
        )
        lines.append(
            f"No model was released: {why}. The federated column is empty; the logs of each "
            "member say more."
        )
    if record.plaintext_bytes:
        ratio = record.bytes_sent / record.plaintext_bytes
        lines.append(
            f"Bytes on the wire (node uploads): {record.bytes_sent:,} sealed shares vs "
            f"{record.plaintext_bytes:,} plaintext float32 = {ratio:.2f}x "
            "(one share per aggregator)"
        )
    else:
        lines.append("Bytes on the wire (node uploads): none, no node sent a share")
    return lines
