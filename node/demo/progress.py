"""What the demo shows while the federation runs, read from the members' JSON logs.

`LogFollower` reads the new lines of each member's log; `follow_rounds` turns those events
into a progress bar per round and a `RunRecord`, and scores each release on every site's
held-out data as soon as all sites have installed it (the learning curve).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from node.demo.federation import PreparedFederation
from node.demo.options import DemoOptions
from node.demo.report import RunRecord, Score, SiteData, load_site_data, mean, score_onnx
from node.errors import NodeError
from tessera.observability.events import Event


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


def follow_rounds(
    opts: DemoOptions,
    prepared: PreparedFederation,
    processes: dict[str, subprocess.Popen[bytes]],
    logs: LogFollower,
    show: Progress,
) -> tuple[RunRecord, list[tuple[int, dict[str, Score]]]]:
    """Follow the logs until the last round ends; score each release as it lands."""
    from node.round.releases import open_model_store
    from node.setup import study_preprocess
    from tessera.wire.release import CARD_FILE

    spec = prepared.spec
    preprocess = study_preprocess(prepared.study_model())
    record = RunRecord()
    curve: list[tuple[int, dict[str, Score]]] = []
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
            if name == Event.ROUND_OPENED and member == spec.leader:
                show.bar(
                    ended,
                    opts.rounds,
                    f"round {event['round']} open "
                    f"({event['algorithm']}, {event['expected']} sites)",
                )
            elif name == Event.ROUND_JOINED:
                record.joined[member] = record.joined.get(member, 0) + 1
                record.epsilon[member] = float(event["epsilon_total"])  # type: ignore[arg-type]
                record.bytes_sent += int(event["bytes_sent"])  # type: ignore[call-overload]
                record.plaintext_bytes += int(event["plaintext_bytes"])  # type: ignore[call-overload]
            elif name == Event.ROUND_REFUSED:
                show.say(f"    {member} refused round {event['round']}: {event['reason']}")
            elif name == Event.ROUND_ABORTED and member == spec.leader:
                ended += 1
                record.aborts.append(event)
                show.bar(ended, opts.rounds, f"round {event['round']} aborted: {event['reason']}")
            elif name == Event.RELEASE_INSTALLED:
                installed.setdefault(int(event["version"]), set()).add(member)  # type: ignore[call-overload]
        for version in sorted(installed):
            if installed[version] != set(spec.sites) or version <= len(curve):
                continue
            if not data:
                data = [load_site_data(s, prepared.state(s), preprocess) for s in spec.sites]
            store = open_model_store(prepared.state(spec.sites[0]))
            scores = score_onnx(store.onnx_bytes(version), data)
            card = json.loads((store.folder(version) / CARD_FILE).read_text())
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
