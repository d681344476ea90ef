"""The demo's last step: the final signed model, verified and copied out, then served.

`export_final_model` checks both aggregators' signatures on the current release before it
copies the ONNX model, the release and the model card to `<out>/model`; `infer_held_out`
runs that ONNX model on every site's held-out DICOM files, as a site's point-of-care
inference would, and writes the results to `<out>/inference.jsonl`.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

from node.demo.federation import PreparedFederation
from node.demo.progress import Progress


def export_final_model(out: Path, prepared: PreparedFederation, store: object) -> dict[str, str]:
    """Verify the current release's signatures and copy its files to `<out>/model`."""
    from broker.provisioning.bundle import load_bundle
    from node.round.releases import ModelStore
    from tessera.wire.release import (
        CARD_FILE,
        ONNX_FILE,
        RELEASE_FILE,
        ModelRelease,
        verify_release,
    )

    assert isinstance(store, ModelStore)
    version = store.current()
    assert version is not None
    folder = store.folder(version)
    release = ModelRelease.from_bytes((folder / RELEASE_FILE).read_bytes())
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


def infer_held_out(out: Path, prepared: PreparedFederation, onnx: Path, show: Progress) -> str:
    """Run the ONNX model on every site's held-out DICOM files; the results file's path."""
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
