"""A released model stands alone: its ONNX file says every preprocessing step it needs, so a
hospital's own client that knows nothing of Tessera (plain onnxruntime, numpy, pydicom;
`tests/support/plain_onnx_infer.py`) gets the probabilities `tessera node infer` gets."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from node.synth.sites import SynthConfig, generate
from tessera.models.study import StudyModel
from tests.support.governance import STUDY_ID, build_federation
from tests.support.models import pydicom_file

PLAIN_CLIENT = Path(__file__).resolve().parents[1] / "support" / "plain_onnx_infer.py"


def test_the_plain_client_imports_nothing_of_tessera() -> None:
    tree = ast.parse(PLAIN_CLIENT.read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}  # fmt: skip
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}  # fmt: skip
    assert imported == {"__future__", "json", "sys", "numpy", "onnxruntime", "pydicom"}


def test_a_released_model_gives_the_same_probabilities_in_plain_onnxruntime(
    tmp_path: Path,
) -> None:
    # The study names only size and channels; the rest of the preprocessing (window, frame,
    # mean, std) is the pipeline's default, which the release must spell out.
    terms = {"labels": ["absent", "present"], "architectures": ["small-cnn-v1"],
             "preprocessing": {"size": 32, "channels": 1}}  # fmt: skip
    fed = build_federation(tmp_path / "fed", study=terms)
    study = fed.manifest.study(STUDY_ID)
    assert study is not None
    model = StudyModel.from_study(fed.manifest.federation_id, study, "small-cnn-v1")
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(model.export(model.genesis(), 1))  # what every aggregator signs
    generate(SynthConfig(tmp_path / "synth", sites=1, seed=3, images_per_site=4, size=48))
    files = [pydicom_file("CT_small.dcm"), pydicom_file("MR_small.dcm")]
    files += sorted((tmp_path / "synth").rglob("*.dcm"))[:3]

    tessera = subprocess.run(
        [sys.executable, "-m", "tessera.cli", "node", "infer", "--model", str(onnx),
         "--state", str(tmp_path / "state"), "--threads", "1", *map(str, files)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert tessera.returncode == 0, tessera.stderr[-2000:]
    plain = subprocess.run(
        [sys.executable, "-I", str(PLAIN_CLIENT), str(onnx), *map(str, files)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert plain.returncode == 0, plain.stderr[-2000:]

    expected = [json.loads(line)["probabilities"] for line in tessera.stdout.splitlines()]
    found = [json.loads(line)["probabilities"] for line in plain.stdout.splitlines()]
    assert len(expected) == len(found) == len(files)
    for ours, theirs in zip(expected, found, strict=True):
        assert theirs == pytest.approx(ours, abs=1e-6)
    # The inputs differ enough that a wrong step would show.
    assert len({round(p["present"], 4) for p in expected}) == len(files)


def test_the_pipeline_defaults_are_the_intakes_and_presets_resolve_to_numbers() -> None:
    from dataclasses import asdict, fields

    from node.intake.preprocess import PreprocessConfig
    from tessera.pipeline import PREPROCESS_DEFAULTS, PREPROCESS_TERMS, resolved_preprocess

    assert tuple(f.name for f in fields(PreprocessConfig)) == PREPROCESS_TERMS
    assert asdict(PreprocessConfig()) == dict(PREPROCESS_DEFAULTS)
    resolved = resolved_preprocess({"window": "ct-lung", "size": 32, "mean": 0})
    assert resolved == {"size": 32, "channels": 1, "window": "-600/1500", "frame": "middle",
                        "mean": 0.0, "std": 0.25, "pipeline_version": 1}  # fmt: skip
    # The resolved window preprocesses exactly as the preset does.
    assert (
        PreprocessConfig(window="-600/1500").window_bounds()
        == PreprocessConfig(window="ct-lung").window_bounds()
    )
    with pytest.raises(ValueError, match="unknown preprocessing terms"):
        resolved_preprocess({"gamma": 2})
