"""`tessera demo`: three synthetic hospitals and two aggregators, each its own process.

1. writes synthetic hospitals (non-IID: lesion prevalence differs by site) as DICOM;
2. prepares the federation (`node.demo.federation`): provisioning, a signed manifest,
   steward approvals, one configuration per member;
3. starts the broker: the embedded development broker (plaintext MQTT 3.1.1, loopback), or
   with `--broker mosquitto` the local Mosquitto with the provisioned TLS and ACL;
4. starts two `tessera aggregator run` and three `tessera node run` processes and follows
   their JSON logs: a progress bar per round, held-out accuracy of each release;
5. stops them, trains the centralised and local-only baselines, and writes the report,
   `learning-curves.png`, the final signed release and its ONNX model;
6. runs point-of-care inference with that ONNX model on held-out DICOM files.

Everything lands in `--out` (default `./tessera-demo`); a second run replaces an earlier
demo's folder, and refuses any other non-empty folder.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from node.config import TrainingSettings
from node.demo.federation import FederationSpec, PreparedFederation, prepare_federation
from node.demo.report import (
    BaselinePlan,
    RunRecord,
    Score,
    SiteData,
    baselines,
    load_site_data,
    mean,
    plot_curves,
    score_onnx,
    write_json,
)
from node.errors import NodeError

MARKER = ".tessera-demo"


@dataclass(frozen=True)
class DemoOptions:
    """What `tessera demo` runs."""

    out: Path = Path("tessera-demo")
    rounds: int = 8
    sites: int = 3
    images_per_site: int = 160
    image_size: int = 32
    skew: float = 0.8
    seed: int = 0
    broker: str = "embedded"  # or "mosquitto"
    modality: str = "cr"  # one scanner type: the skew is in the labels, not the pixels
    lesion_contrast: float = 40.0
    lesion_scale: float = 2.5
    architecture: str = "spot-cnn-v1"
    local_epochs: int = 2
    learning_rate: float = 0.1
    batch_size: int = 32
    noise_multiplier: float = 0.5
    clip_norm: float = 1.0  # L2 bound on each node's round delta (the secure sum's range)
    epsilon: float = 60.0
    algorithm: str = "fedavg"  # the first round's; the adaptive policy may switch later
    adaptive: bool = True
    adaptive_lower: float = 1.0
    adaptive_upper: float = 4.0
    timeout_s: float = 40.0  # per round


@dataclass
class Progress:
    """Prints to the terminal: a bar per round (`\\r` updates on a TTY, lines otherwise)."""

    stream: IO[str] = field(default_factory=lambda: sys.stdout)

    def say(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def bar(self, done: int, total: int, text: str) -> None:
        width = 24
        filled = round(width * done / max(total, 1))
        self.say(f"  [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {text}")


class LogFollower:
    """Reads new JSON lines from the services' log files."""

    def __init__(self, paths: dict[str, Path]) -> None:
        self.paths = paths
        self.offsets = dict.fromkeys(paths, 0)

    def events(self) -> list[tuple[str, dict[str, object]]]:
        found = []
        for member, path in self.paths.items():
            if not path.exists():
                continue
            with path.open("rb") as handle:
                handle.seek(self.offsets[member])
                data = handle.read()
            complete = data[: data.rfind(b"\n") + 1]
            self.offsets[member] += len(complete)
            for line in complete.splitlines():
                try:
                    found.append((member, json.loads(line)))
                except ValueError:
                    continue  # a non-JSON line (a crash's traceback) is in the log file
        return found


def _fresh_out(out: Path) -> Path:
    out = out.resolve()
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise NodeError(f"{out} is not empty and not an earlier demo; pass another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by tessera demo; the next demo run replaces it\n")
    return out


def _spawn(kind: str, config: Path, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("ab") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "tessera.cli", kind, "run", "--config", str(config)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


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
    broker, port, stop_broker = _start_broker(opts.broker, prepared, out)
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
        for member in spec.aggregators:
            processes[member] = _spawn("aggregator", prepared.config(member), logs[member], env)
        for member in spec.sites:
            processes[member] = _spawn("node", prepared.config(member), logs[member], env)
        record, curve = _follow(opts, prepared, processes, LogFollower(logs), show)
    finally:
        _stop(processes)
        stop_broker()
    show.say("5/6 baselines (same model, DP settings and epochs) and the report")
    report = _report(opts, out, prepared, record, curve, show)
    report["seconds"] = round(time.monotonic() - started, 1)
    write_json(out / "report.json", report)
    show.say(f"done in {report['seconds']} s; report: {out / 'report.json'}")
    return report


def _start_broker(
    kind: str, prepared: PreparedFederation, out: Path
) -> tuple[str, int, Callable[[], None]]:
    if kind == "mosquitto":
        from broker.local_mosquitto import MosquittoProcess

        mosquitto = MosquittoProcess(prepared.federation, prepared.provisioned, out / "broker")
        mosquitto.start()
        return "Mosquitto (mutual TLS, ACL)", mosquitto.mqtt_port, mosquitto.stop
    from broker.devbroker import DevBroker

    dev = DevBroker().start()
    return "embedded development broker (plaintext, loopback only)", dev.port, dev.stop


def _stop(processes: dict[str, subprocess.Popen[bytes]]) -> None:
    for process in processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes.values():
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def _follow(
    opts: DemoOptions,
    prepared: PreparedFederation,
    processes: dict[str, subprocess.Popen[bytes]],
    logs: LogFollower,
    show: Progress,
) -> tuple[RunRecord, list[tuple[int, dict[str, Score]]]]:
    """Follow the logs until the last round ends; score each release as it lands."""
    from node.round.releases import open_model_store
    from node.setup import study_preprocess

    spec = prepared.spec
    preprocess = study_preprocess(prepared.study_model())
    record, curve = RunRecord(), []
    data: list[SiteData] = []
    installed: dict[int, set[str]] = {}
    ended = 0
    deadline = time.monotonic() + 60.0 + opts.timeout_s * opts.rounds
    while ended < opts.rounds and time.monotonic() < deadline:
        time.sleep(0.5)
        for member, process in processes.items():
            if process.poll() is not None:
                raise NodeError(f"{member} exited with {process.returncode}; see its log")
        for member, event in logs.events():
            name = event.get("event")
            if name == "round-opened" and member == spec.leader:
                show.bar(
                    ended,
                    opts.rounds,
                    f"round {event['round']} open "
                    f"({event['algorithm']}, {event['expected']} sites)",
                )
            elif name == "round-joined":
                record.joined[member] = record.joined.get(member, 0) + 1
                record.epsilon[member] = float(event["epsilon_total"])  # type: ignore[arg-type]
                record.bytes_sent += int(event["bytes_sent"])  # type: ignore[call-overload]
                record.plaintext_bytes += int(event["plaintext_bytes"])  # type: ignore[call-overload]
            elif name == "round-refused":
                show.say(f"    {member} refused round {event['round']}: {event['reason']}")
            elif name == "round-abort" and member == spec.leader:
                ended += 1
                record.aborts.append(event)
                show.bar(ended, opts.rounds, f"round {event['round']} aborted: {event['reason']}")
            elif name == "release-installed":
                installed.setdefault(int(event["version"]), set()).add(member)  # type: ignore[call-overload]
        for version in sorted(installed):
            if installed[version] != set(spec.sites) or version <= len(curve):
                continue
            if not data:
                data = [load_site_data(s, prepared.state(s), preprocess) for s in spec.sites]
            store = open_model_store(prepared.state(spec.sites[0]))
            scores = score_onnx(store.onnx_bytes(version), data)
            card = json.loads((store.folder(version) / "card.json").read_text())
            curve.append((version, scores))
            record.rounds.append(
                {
                    "version": version,
                    "round": card["round"],
                    "participants": card["participants"]["count"],
                    "algorithm": card["strategy"]["algorithm"],
                    "accuracy": mean(scores, "accuracy"),
                    "auc": mean(scores, "auc"),
                }
            )
            record.switches += [w for w in card["strategy"]["switches"] if w not in record.switches]
            ended += 1
            show.bar(
                ended,
                opts.rounds,
                f"round {card['round']} released v{version} "
                f"({card['participants']['count']} sites, {card['strategy']['algorithm']}): "
                f"held-out accuracy {mean(scores, 'accuracy'):.3f}, "
                f"AUC {mean(scores, 'auc'):.3f}",
            )
    if ended < opts.rounds:
        show.say(f"  stopped waiting: {ended} of {opts.rounds} rounds ended in time")
    return record, curve


def _report(
    opts: DemoOptions,
    out: Path,
    prepared: PreparedFederation,
    record: RunRecord,
    curve: list[tuple[int, dict[str, Score]]],
    show: Progress,
) -> dict[str, object]:
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
    show.say("Held-out accuracy / AUC per site")
    show.say(
        f"  {'site':8} {'test n':>6}  {'federated':>15}  {'centralised':>15}  {'local-only':>15}"
    )
    for d in data:
        f = final.get(d.site)
        fed = f"{f.accuracy:.3f} / {f.auc:.3f}" if f else "-"
        c, loc = central[d.site], local[d.site]
        show.say(
            f"  {d.site:8} {len(d.test_y):>6}  {fed:>15}  "
            f"{c.accuracy:.3f} / {c.auc:.3f}  {loc.accuracy:.3f} / {loc.auc:.3f}"
        )
    show.say(
        f"  {'mean':8} {'':>6}  {mean(final, 'accuracy'):.3f} / {mean(final, 'auc'):.3f}  "
        f"{mean(central, 'accuracy'):.3f} / {mean(central, 'auc'):.3f}  "
        f"{mean(local, 'accuracy'):.3f} / {mean(local, 'auc'):.3f}"
    )
    ratio = record.bytes_sent / record.plaintext_bytes if record.plaintext_bytes else float("nan")
    show.say(
        f"Bytes on the wire (node uploads): {record.bytes_sent:,} sealed shares vs "
        f"{record.plaintext_bytes:,} plaintext float32 = {ratio:.2f}x "
        f"(one share per aggregator)"
    )
    show.say(
        "Epsilon spent per site (DP-SGD, RDP accountant, delta "
        f"{study.dp.delta:g}): "
        + ", ".join(f"{s} {e:.2f}" for s, e in sorted(record.epsilon.items()))
    )
    if record.switches:
        for switch in record.switches:
            show.say(f"Strategy switch: {switch}")
    else:
        show.say(
            "Strategy switches: none (the adaptive policy kept "
            f"{record.rounds[-1]['algorithm'] if record.rounds else '-'})"
        )
    files = {}
    if curve:
        plot_curves(out / "learning-curves.png", curve, central, local)
        files["plot"] = str(out / "learning-curves.png")
        files.update(_final_model(out, prepared, open_model_store(prepared.state(spec.sites[0]))))
        show.say(f"Learning curves: {files['plot']}")
        show.say(
            f"Final signed model: {files['onnx']} (release with both signatures: "
            f"{files['release']})"
        )
        show.say("6/6 point-of-care inference on held-out DICOM files with that ONNX model:")
        files["inference"] = _inference(out, prepared, Path(files["onnx"]), show)
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


def _final_model(out: Path, prepared: PreparedFederation, store: object) -> dict[str, str]:
    from broker.provisioning.bundle import load_bundle
    from node.round.releases import CARD_FILE, ONNX_FILE, RELEASE_FILE, ModelStore
    from tessera.wire.release import ModelRelease, verify_release

    assert isinstance(store, ModelStore)
    version = store.current()
    assert version is not None
    folder = store.folder(version)
    release = ModelRelease.from_bytes((folder / RELEASE_FILE).read_bytes(), 1 << 30)
    roster = load_bundle(prepared.bundle(prepared.spec.sites[0])).roster
    keys = roster.signing_keys()
    verify_release(release, {a: keys[a] for a in roster.aggregator_ids})  # raises if not
    target = out / "model"
    target.mkdir()
    for name in (ONNX_FILE, RELEASE_FILE, CARD_FILE):
        shutil.copyfile(folder / name, target / name)
    (target / ONNX_FILE).write_bytes(store.onnx_bytes(version))  # hash-checked copy
    return {
        "onnx": str(target / ONNX_FILE),
        "release": str(target / RELEASE_FILE),
        "card": str(target / CARD_FILE),
    }


def _inference(out: Path, prepared: PreparedFederation, onnx: Path, show: Progress) -> str:
    from node.inference.runtime import infer_dicom_bytes, load_model
    from node.intake.phi import load_or_create_site_secret

    model = load_model(onnx.read_bytes(), threads=1)
    results, right = [], 0
    for index, site in enumerate(prepared.spec.sites):
        folder = out / "hospitals" / f"site-{index:02d}"
        secret = load_or_create_site_secret(prepared.state(site))
        with (folder / "labels.csv").open(newline="", encoding="utf-8") as handle:
            held_out = {
                r["sop_instance_uid"]: r["label"]
                for r in csv.DictReader(handle)
                if r["split"] == "test"
            }
        for path in sorted((folder / "dicom").rglob("*.dcm")):
            import pydicom

            uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            if uid not in held_out:
                continue
            result = infer_dicom_bytes(model, path.read_bytes(), secret)
            right += result["label"] == held_out[uid]
            results.append({"site": site, **result, "truth": held_out[uid]})
    for line in results[:3]:
        shown = {k: line[k] for k in ("site", "instance", "label", "truth", "model_version")}
        show.say(f"  {json.dumps(shown)}")
    show.say(
        f"  {len(results)} held-out DICOM files: {right / max(len(results), 1):.3f} correct "
        "(instances named by keyed hash; no patient identifier leaves the node)"
    )
    path = out / "inference.jsonl"
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in results))
    return str(path)
