"""`tessera demo`: three synthetic hospitals and two aggregators, each its own process.

1. writes synthetic hospitals (non-IID: lesion prevalence differs by site) as DICOM;
2. prepares the federation (`node.demo.federation`): provisioning, a signed manifest,
   steward approvals, one configuration per member;
3. starts the broker: the embedded development broker (plaintext MQTT 3.1.1, loopback), or
   with `--broker mosquitto` the local Mosquitto with the provisioned TLS and ACL;
4. starts two `tessera aggregator run` and three `tessera node run` processes
   (`node.demo.processes`) and follows their JSON logs (`node.demo.progress`): a progress
   bar per round, held-out accuracy of each release;
5. stops them, trains the centralised and local-only baselines, and writes the report,
   `learning-curves.png`, the final signed release and its ONNX model (`node.demo.summary`);
6. runs point-of-care inference with that ONNX model on held-out DICOM files
   (`node.demo.point_of_care`).

Everything lands in `--out` (default `./tessera-demo`); a second run replaces an earlier
demo's folder, and refuses any other non-empty folder.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from node.demo.federation import FederationSpec, prepare_federation
from node.demo.options import DemoOptions
from node.demo.processes import spawn_member, start_broker, stop_members
from node.demo.progress import LogFollower, Progress, follow_rounds
from node.demo.report import write_json
from node.demo.summary import summarise_run
from node.errors import NodeError

MARKER = ".tessera-demo"


def _fresh_out(out: Path) -> Path:
    out = out.resolve()
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise NodeError(f"{out} is not empty and not an earlier demo; pass another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by tessera demo; the next demo run replaces it\n")
    # It holds a federation CA and every member's keys: git ignores it wherever it is.
    (out / ".gitignore").write_text("# written by tessera demo: keys and a CA, never commit\n*\n")
    return out


def run_demo(opts: DemoOptions, progress: Progress | None = None) -> dict[str, object]:
    """Run the whole demo; returns the report (also written to `<out>/report.json`)."""
    from node.synth.sites import SynthConfig, generate

    show = progress or Progress()
    started = time.monotonic()
    out = _fresh_out(opts.out)
    show.say(f"Tessera demo: {opts.sites} hospitals, 2 aggregators, {opts.rounds} rounds -> {out}")
    show.say("1/6 writing synthetic hospitals (DICOM, non-IID labels)")
    generate(
        SynthConfig(
            out=out / "hospitals",
            sites=opts.sites,
            seed=opts.seed,
            images_per_site=opts.images_per_site,
            skew=opts.skew,
            size=2 * opts.image_size,
            modality=opts.modality,
            lesion_contrast=opts.lesion_contrast,
            lesion_scale=opts.lesion_scale,
        )
    )
    spec = FederationSpec(
        sites=tuple(f"site-{chr(ord('a') + i)}" for i in range(opts.sites)),
        image_size=opts.image_size,
        max_rounds=opts.rounds,
        clip_norm=opts.clip_norm,
        epsilon=opts.epsilon,
        architecture=opts.architecture,
        round={
            "collect_timeout_s": 60.0,
            "agreement_timeout_s": 30.0,
            "pause_s": 0.5,
            "local_epochs": opts.local_epochs,
            "learning_rate": opts.learning_rate,
            "start_wait_s": 60.0,
            "algorithm": opts.algorithm,
        },
        strategy={
            "adaptive": opts.adaptive,
            "lower": opts.adaptive_lower,
            "upper": opts.adaptive_upper,
        },
        training={
            "batch_size": opts.batch_size,
            "noise_multiplier": opts.noise_multiplier,
            "seed": opts.seed,
        },
    )
    site_folder = {s: out / "hospitals" / f"site-{i:02d}" for i, s in enumerate(spec.sites)}
    show.say("2/6 provisioning: CA, keys, signed roster, signed manifest, steward approvals")
    prepared = prepare_federation(
        out / "federation",
        spec,
        tls=opts.broker == "mosquitto",
        dicom={s: f / "dicom" for s, f in site_folder.items()},
        labels_csv={s: f / "labels.csv" for s, f in site_folder.items()},
    )
    broker, port, stop_broker = start_broker(opts.broker, prepared, out)
    show.say(f"3/6 broker: {broker} on 127.0.0.1:{port}")
    logs = {m: out / "logs" / f"{m}.log" for m in (*spec.aggregators, *spec.sites)}
    (out / "logs").mkdir()
    env = {**os.environ, "TESSERA_BROKER_PORT": str(port), "TESSERA_BROKER_HOST": "127.0.0.1"}
    processes = {}
    try:
        show.say(
            f"4/6 starting {len(spec.aggregators)} aggregator and {len(spec.sites)} node "
            "processes; training rounds:"
        )
        for kind, members in (("aggregator", spec.aggregators), ("node", spec.sites)):
            for member in members:
                processes[member] = spawn_member(kind, prepared.config(member), logs[member], env)
        record, curve = follow_rounds(opts, prepared, processes, LogFollower(logs), show)
    finally:
        stop_members(processes)
        stop_broker()
    show.say("5/6 baselines (same model, DP settings and epochs) and the report")
    report = summarise_run(opts, out, prepared, record, curve, show)
    report["seconds"] = round(time.monotonic() - started, 1)
    write_json(out / "report.json", report)
    show.say(f"done in {report['seconds']} s; report: {out / 'report.json'}")
    return report
