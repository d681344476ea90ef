"""Label sources: a CSV manifest keyed by SOP Instance UID, Study Instance UID or Accession
Number, or one folder per class.

Manifest keys are hashed with the site secret as soon as they are read, so the index never
holds them in clear. A label outside the study's label set is not used (the image stays
usable for inference, unlabelled) and is counted in the report.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path, PurePath

from node.errors import NodeError
from node.intake.phi import keyed_hash

# CSV column -> (index kind, keyed-hash domain)
KEY_COLUMNS = {
    "sop_instance_uid": ("instance", "instance"),
    "study_instance_uid": ("study", "study"),
    "accession_number": ("accession", "accession"),
}
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Manifest:
    """A parsed, hashed manifest plus what was wrong with it."""

    rows: tuple[tuple[str, str, str, str], ...]
    out_of_set: dict[str, int] = field(default_factory=dict)
    blank: int = 0


def load_manifest(path: Path, secret: bytes, label_set: tuple[str, ...] | None) -> Manifest:
    """Read a labels CSV with a `label` column, one key column and an optional `split`."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip().lower() for c in reader.fieldnames or []]
            key_column = next((c for c in KEY_COLUMNS if c in columns), None)
            if key_column is None or "label" not in columns:
                raise NodeError(
                    f"labels manifest {path} has columns {columns}; it needs 'label' and one of "
                    f"{', '.join(KEY_COLUMNS)} (and optionally 'split' = train|test)"
                )
            rows: list[tuple[str, str, str, str]] = []
            out_of_set: dict[str, int] = {}
            blank = 0
            for raw in reader:
                record = {str(k).strip().lower(): (v or "").strip() for k, v in raw.items() if k}
                kind, domain = KEY_COLUMNS[key_column]
                key, label = record.get(key_column, ""), record.get("label", "")
                split = record.get("split", "") or "train"
                if not key or not label:
                    blank += 1
                    continue
                if split not in SPLITS:
                    raise NodeError(
                        f"labels manifest {path} line {reader.line_num}: split must be one of "
                        f"{SPLITS}, got {split!r}"
                    )
                if label_set is not None and label not in label_set:
                    out_of_set[label] = out_of_set.get(label, 0) + 1
                    continue
                rows.append((kind, keyed_hash(domain, key, secret), label, split))
    except OSError as error:
        raise NodeError(f"cannot read labels manifest {path}: {error.strerror}") from None
    return Manifest(rows=tuple(rows), out_of_set=out_of_set, blank=blank)


def folder_label(relative: PurePath, label_set: tuple[str, ...]) -> str | None:
    """The class named by a file's top-level folder, when it is in the label set.

    Folder names outside the set are never stored or logged: at a hospital they may well
    be patient names.
    """
    if len(relative.parts) < 2 or relative.parts[0] not in label_set:
        return None
    return relative.parts[0]
