"""`tessera node ingest --report`: what was ingested, what was quarantined and why.

Built from the index alone, so it carries no identifiers. `--show-paths` resolves the
quarantined entries back to paths by re-hashing the intake folder's paths with the site
secret; those paths are printed to the operator's terminal only, never logged or stored.
"""

from __future__ import annotations

import json
from pathlib import Path

from node.intake import index
from node.intake.ingest import IntakeConfig, scan_roots
from node.intake.phi import keyed_hash, load_or_create_site_secret
from node.intake.screen import REASONS


def build_report(state_dir: Path, digest: str) -> dict[str, object]:
    """Counts by status, quarantine reason (with a sample detail) and label/split."""
    conn = index.connect(state_dir)
    try:
        status = dict(conn.execute("SELECT status, COUNT(*) FROM files GROUP BY status").fetchall())
        reasons = {
            reason: {"files": count, "meaning": REASONS.get(reason, reason), "example": detail}
            for reason, count, detail in conn.execute(
                "SELECT reason, COUNT(*), MIN(detail) FROM files WHERE status = 'quarantined' "
                "GROUP BY reason ORDER BY COUNT(*) DESC"
            )
        }
        labels: dict[str, int] = {}
        for _, label, split, _, _ in index.labelled_instances(conn, digest):
            name = f"{split}/{label if label is not None else '(unlabelled)'}"
            labels[name] = labels.get(name, 0) + 1
        last = json.loads(index.get_meta(conn, "last_summary") or "{}")
    finally:
        conn.close()
    return {
        "files_ingested": status.get("ingested", 0),
        "files_quarantined": status.get("quarantined", 0),
        "instances": dict(sorted(labels.items())),
        "quarantine": reasons,
        "labels_out_of_set": last.get("labels_out_of_set", {}),
        "last_run": {k: v for k, v in last.items() if k != "labels_out_of_set"},
    }


def format_report(report: dict[str, object]) -> str:
    """Human-readable rendering of `build_report`'s result."""
    lines = [
        f"ingested files:    {report['files_ingested']}",
        f"quarantined files: {report['files_quarantined']}",
        "instances by split/label:",
    ]
    instances = report["instances"]
    assert isinstance(instances, dict)
    lines += [f"  {name:<28} {count}" for name, count in instances.items()] or ["  (none)"]
    quarantine = report["quarantine"]
    assert isinstance(quarantine, dict)
    if quarantine:
        lines.append("quarantined by reason:")
        for reason, info in quarantine.items():
            lines.append(f"  {reason:<20} {info['files']:>6}  {info['meaning']}")
            lines.append(f"  {'':<20} {'':>6}  e.g. {info['example']}")
    out_of_set = report["labels_out_of_set"]
    assert isinstance(out_of_set, dict)
    if out_of_set:
        lines.append("manifest labels outside the study's label set (not used):")
        lines += [f"  {label!r}: {count} rows" for label, count in out_of_set.items()]
    return "\n".join(lines)


def quarantined_paths(cfg: IntakeConfig) -> list[tuple[str, str, str]]:
    """(relative path, reason, detail) for each quarantined file still in the intake."""
    secret = load_or_create_site_secret(cfg.state_dir)
    conn = index.connect(cfg.state_dir)
    try:
        rows = {
            key: (reason, detail)
            for key, reason, detail in conn.execute(
                "SELECT path_key, reason, detail FROM files WHERE status = 'quarantined'"
            )
        }
    finally:
        conn.close()
    found = []
    for _, name, _ in scan_roots(cfg):
        relative = name.as_posix()
        hit = rows.get(keyed_hash("path", relative, secret))
        if hit:
            found.append((relative, hit[0], hit[1]))
    return found
