"""`tessera models list|show` over a registry of real, fully signed releases."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from aggregator.registry import GENESIS_PARENT, Registry
from aggregator.store import Store
from tessera.cli import main
from tests.aggregator.test_registry import PUBLIC, card, signed

# Version 3 comes from two sites under k=3: its card may give only their count.
FEW_SITES = {"site-x": 0.5, "site-y": 0.9}


def build_state(state: Path, study: str = "study-1", versions: int = 3) -> list[bytes]:
    """Register `versions` chained releases the way the aggregator does; their model hashes."""
    store = Store(state / "aggregator.sqlite3", state / "shares")
    registry = Registry(store, state / "models")
    parent, hashes = GENESIS_PARENT, []
    for version in range(1, versions + 1):
        extra = {"epsilon_per_site": FEW_SITES} if version == 3 else {}
        release = signed(card(version, parent, study_id=study, **extra), seed=version)
        registry.register(release, PUBLIC)
        parent = release.model_hash
        hashes.append(parent)
    store.close()
    return hashes


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[bytes]]:
    root = tmp_path_factory.mktemp("aggregator-state")
    return root, build_state(root)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_gives_one_line_per_version_in_order(state, capsys) -> None:
    root, _ = state
    code, out, _ = run(capsys, "models", "list", "--state", str(root))
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == [
        "study", "version", "parent", "round", "participants", "strategy", "created",
    ]  # fmt: skip
    assert [row.split()[:5] for row in rows] == [
        ["study-1", "1", "root", "1", "3"],
        ["study-1", "2", "1", "2", "3"],
        ["study-1", "3", "2", "3", "3"],
    ]
    assert all("fedavg+fedadam (adaptive)" in row for row in rows)
    assert all(row.split()[-1].endswith("Z") for row in rows)  # the registration time, UTC
    assert "site-" not in out


def test_list_json_matches_the_store(state, capsys) -> None:
    root, _ = state
    code, out, _ = run(capsys, "models", "list", "--state", str(root), "--json")
    assert code == 0
    rows = json.loads(out)
    assert [(r["version"], r["parent"], r["round"]) for r in rows] == [
        (1, "root", 1), (2, "1", 2), (3, "2", 3),
    ]  # fmt: skip
    assert {r["strategy"] for r in rows} == {"fedavg+fedadam (adaptive)"}


def test_show_gives_lineage_card_signers_and_verification(state, capsys) -> None:
    root, hashes = state
    code, out, _ = run(capsys, "models", "show", "3", "--state", str(root))
    assert code == 0
    assert "lineage:       v3 (round 3) <- v2 (round 2) <- v1 (round 1)" in out
    assert "participants:  3 (minimum k=3)" in out
    assert "switch in round 2: fedavg -> fedsgd" in out
    assert "2 site(s), at most 0.9 (fewer than k, so not named)" in out
    assert "accuracy: 0.9" in out and "loss: 0.42" in out
    assert f"model hash:    {hashes[2].hex()}" in out
    assert f"parent hash:   {hashes[1].hex()}" in out
    assert "signed by:     agg-1, agg-2" in out
    assert "verified:      yes" in out
    assert "site-x" not in out and "site-y" not in out  # fewer than k: never named


def test_show_json_names_sites_only_where_k_took_part(state, capsys) -> None:
    root, hashes = state
    code, out, _ = run(capsys, "models", "show", "1", "--state", str(root), "--json")
    assert code == 0
    first = json.loads(out)
    assert first["card"]["privacy"]["epsilon_per_site"] == {
        "site-a": 0.75, "site-b": 1.5, "site-c": 2.0,
    }  # fmt: skip
    assert [e["version"] for e in first["lineage"]] == [1]
    assert first["hashes"]["model"] == hashes[0].hex() and first["verified"] is True
    assert first["signers"] == ["agg-1", "agg-2"]
    _, out, _ = run(capsys, "models", "show", "3", "--state", str(root), "--json")
    third = json.loads(out)
    assert third["card"]["privacy"] == {"sites": 2, "epsilon_max": 0.9}
    assert [e["model_hash"] for e in third["lineage"]] == [h.hex() for h in reversed(hashes)]
    assert "site-x" not in out


def test_unknown_version_exits_2_naming_the_known_ones(state, capsys) -> None:
    root, _ = state
    code, out, err = run(capsys, "models", "show", "7", "--state", str(root))
    assert code == 2 and out == ""
    assert "no model version 7" in err and "known versions: 1, 2, 3" in err


def test_missing_state_is_a_clear_error_and_creates_nothing(tmp_path, capsys) -> None:
    code, _, err = run(capsys, "models", "list", "--state", str(tmp_path / "nowhere"))
    assert code == 2 and "no aggregator state" in err and "--state" in err
    assert not (tmp_path / "nowhere").exists()


def test_tampered_version_shows_but_fails_verification(tmp_path, capsys) -> None:
    build_state(tmp_path, versions=2)
    onnx = next((tmp_path / "models").rglob("0000000002/model.onnx"))
    onnx.write_bytes(b"evil")
    code, out, _ = run(capsys, "models", "show", "2", "--state", str(tmp_path))
    assert code == 1
    assert "verified:      NO:" in out and "does not match its registered hash" in out
    code, out, _ = run(capsys, "models", "show", "1", "--state", str(tmp_path))
    assert code == 0 and "verified:      yes" in out


def test_several_studies_need_study(tmp_path, capsys) -> None:
    build_state(tmp_path, "study-1", versions=1)
    build_state(tmp_path, "study-2", versions=2)
    code, _, err = run(capsys, "models", "show", "1", "--state", str(tmp_path))
    assert code == 2 and "study-1, study-2" in err and "--study" in err
    code, out, _ = run(
        capsys, "models", "show", "2", "--state", str(tmp_path), "--study", "study-2"
    )
    assert code == 0 and "model study-2 version 2" in out
    code, out, _ = run(capsys, "models", "list", "--state", str(tmp_path), "--study", "study-2")
    assert [row.split()[:2] for row in out.splitlines()[1:]] == [["study-2", "1"], ["study-2", "2"]]


def test_the_installed_command_lists_versions(state) -> None:
    root, _ = state
    result = subprocess.run(
        [sys.executable, "-m", "tessera.cli", "models", "list", "--state", str(root)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert [line.split()[1] for line in result.stdout.splitlines()[1:]] == ["1", "2", "3"]
    missing = subprocess.run(
        [sys.executable, "-m", "tessera.cli", "models", "show", "9", "--state", str(root)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert missing.returncode == 2 and "known versions: 1, 2, 3" in missing.stderr


def test_lineage_stops_at_a_parent_this_registry_lacks(tmp_path, capsys) -> None:
    store = Store(tmp_path / "aggregator.sqlite3", tmp_path / "shares")
    orphan_parent = bytes(range(32))
    Registry(store, tmp_path / "models").register(signed(card(5, orphan_parent), seed=5), PUBLIC)
    store.close()
    code, out, _ = run(capsys, "models", "show", "5", "--state", str(tmp_path))
    assert code == 0
    assert f"v5 (round 5) <- missing parent {orphan_parent.hex()[:12]}" in out
    _, out, _ = run(capsys, "models", "list", "--state", str(tmp_path))
    assert out.splitlines()[1].split()[2] == f"?{orphan_parent.hex()[:12]}"


@pytest.mark.parametrize("stored", ["relative", "absolute (schema 3)"])
def test_a_state_folder_copied_elsewhere_verifies_its_own_files(tmp_path, capsys, stored) -> None:
    """Issue 19, point 10: a registry that named absolute folders made a copy of a state
    folder read the original's files, so the copy said `verified: yes` although its own
    weights had been altered. Stores of schema 3 (absolute paths) are migrated on open."""
    original = tmp_path / "original"
    build_state(original, versions=2)
    if stored.startswith("absolute"):  # what schema 3 wrote: absolute paths, schema "3"
        db = sqlite3.connect(original / "aggregator.sqlite3")
        models = original / "models"
        db.execute(
            "UPDATE models SET folder = ? || '/' || lower(hex(study_id)) || '/' || "
            "printf('%010d', version)",
            (str(models),),
        )
        db.execute("UPDATE meta SET value = '3' WHERE key = 'schema'")
        db.commit()
        db.close()
    copy = tmp_path / "restored-elsewhere"
    shutil.copytree(original, copy)
    weights = next((copy / "models").rglob("0000000002/model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    code, out, _ = run(capsys, "models", "show", "2", "--state", str(copy))
    assert code == 1, out
    assert "verified:      NO:" in out and str(weights) in out
    code, out, _ = run(capsys, "models", "show", "2", "--state", str(original))
    assert code == 0 and "verified:      yes" in out  # the original is untouched
    db = sqlite3.connect(copy / "aggregator.sqlite3")
    folders = [row[0] for row in db.execute("SELECT folder FROM models")]
    db.close()
    assert folders and not any(Path(folder).is_absolute() for folder in folders)
