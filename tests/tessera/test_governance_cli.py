"""`tessera manifest|approve|audit` through the installed command's entry point."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import tomli_w

from tessera.cli import main
from tessera.governance.approvals import load_approval, verify_approval
from tessera.governance.audit import AuditLog, entry_hash
from tessera.governance.canonical import canonical_json
from tessera.governance.manifest import load_manifest, verify_manifest
from tests.support.governance import STUDY_ID, build_federation, manifest_document


@pytest.fixture
def fed(tmp_path: Path):
    return build_federation(tmp_path, n_sites=2, approve=False)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def draft(fed, tmp_path: Path, **study: object) -> Path:
    doc = manifest_document(fed.keys, fed.hpke_keys, fed.site_ids, fed.aggregator_ids)
    doc["studies"][0].update(study)
    if "version" in study:
        doc["federation"]["version"] = study.pop("version")
        doc["studies"][0].pop("version")
    path = tmp_path / f"draft-{len(list(tmp_path.glob('draft-*')))}.toml"
    path.write_text("# hand-written draft\n" + tomli_w.dumps(doc))
    return path


def test_create_sign_verify_show_diff(fed, tmp_path: Path, capsys) -> None:
    manifest = tmp_path / "out.toml"
    code, out, _ = run(capsys, "manifest", "create", draft(fed, tmp_path), "--out", manifest)
    assert code == 0 and "2 sites, 2 aggregators, 1 studies (unsigned" in out
    code, _, err = run(capsys, "manifest", "verify", manifest)
    assert code == 2 and "not signed" in err

    code, out, _ = run(capsys, "manifest", "sign", manifest, "--key", fed.key_path("coordinator"))
    assert code == 0 and "signed" in out
    verify_manifest(load_manifest(manifest), fed.coordinator_public)
    pinned = base64.b64encode(fed.coordinator_public).decode()
    code, out, _ = run(capsys, "manifest", "verify", manifest, "--coordinator-key", pinned)
    assert code == 0 and out.startswith("ok: ") and "warning" not in out
    code, out, _ = run(capsys, "manifest", "verify", manifest)
    assert code == 0 and "warning: checked against the key the manifest names itself" in out
    other = base64.b64encode(fed.keys["auditor"].public_key().public_bytes_raw()).decode()
    code, _, err = run(capsys, "manifest", "verify", manifest, "--coordinator-key", other)
    assert code == 2 and "did not verify" in err

    code, out, _ = run(capsys, "manifest", "show", manifest)
    assert code == 0 and "version 1 (signed)" in out and "DP per site: epsilon 8.0" in out
    code, out, _ = run(capsys, "manifest", "show", manifest, "--canonical")
    assert json.loads(out)["federation"] == {"id": "test-federation", "version": 1}

    newer = tmp_path / "v2.toml"
    bumped = draft(fed, tmp_path, version=2, max_rounds=40)
    code, out, _ = run(capsys, "manifest", "create", bumped, "--out", newer, "--previous", manifest)
    assert code == 0 and "studies[chest-xray].max_rounds: 20 -> 40" in out
    code, out, _ = run(capsys, "manifest", "diff", manifest, newer)
    assert out.splitlines() == [
        "federation.version: 1 -> 2",
        "studies[chest-xray].max_rounds: 20 -> 40",
    ]
    code, _, err = run(capsys, "manifest", "create", bumped, "--out", newer, "--previous", newer)
    assert code == 2 and "not newer" in err


def test_sign_with_a_stewards_key_fails(fed, capsys) -> None:
    code, _, err = run(
        capsys, "manifest", "sign", fed.manifest_path, "--key", fed.key_path("steward-site-1")
    )
    assert code == 2 and "not the manifest's coordinator key" in err


def test_approve_writes_a_valid_approval(fed, tmp_path: Path, capsys) -> None:
    out_file = tmp_path / "approval.json"
    pinned = fed.coordinator_public.hex()
    code, out, _ = run(
        capsys,
        "approve",
        "--manifest",
        fed.manifest_path,
        "--study",
        STUDY_ID,
        "--site",
        "site-1",
        "--key",
        fed.key_path("steward-site-1"),
        "--out",
        out_file,
        "--coordinator-key",
        pinned,
    )
    assert code == 0 and "approved for site site-1 by steward steward-site-1" in out
    verify_approval(load_approval(out_file), fed.manifest, STUDY_ID, "site-1")
    code, _, err = run(
        capsys,
        "approve",
        "--manifest",
        fed.manifest_path,
        "--study",
        STUDY_ID,
        "--site",
        "site-1",
        "--key",
        fed.key_path("steward-site-2"),
        "--out",
        tmp_path / "nope.json",
    )
    assert code == 2 and "not a data steward's key for site 'site-1'" in err
    assert not (tmp_path / "nope.json").exists()


def test_audit_verify_and_export(tmp_path: Path, capsys) -> None:
    log_path = tmp_path / "audit.jsonl"
    with AuditLog.open(log_path) as log:
        log.append("round-opened", {"round": 1})
        log.append("round-refused", {"study_id": "s", "round": 2, "reason": "paused"})
        anchor = log.anchor().to_text()
    code, out, _ = run(capsys, "audit", "verify", log_path, "--anchor", anchor)
    assert code == 0 and "2 entries, chain intact" in out and anchor in out
    export_path = tmp_path / "export.jsonl"
    code, out, _ = run(
        capsys, "audit", "export", log_path, "--out", export_path, "--kind", "round-refused"
    )
    assert code == 0 and "exported 1 verified entries" in out
    assert json.loads(export_path.read_text())["fields"]["reason"] == "paused"
    first, _second = log_path.read_bytes().splitlines(keepends=True)
    log_path.write_bytes(first)
    code, _, err = run(capsys, "audit", "verify", log_path)
    assert code == 0  # a cut-off tail is invisible without the anchor...
    code, _, err = run(capsys, "audit", "verify", log_path, "--anchor", anchor)
    assert code == 2 and "line 2:" in err and "deleted" in err  # ...and caught with it
    log_path.write_bytes(first.replace(b'"round":1', b'"round":7'))
    code, _, err = run(capsys, "audit", "verify", log_path)
    assert code == 2 and "line 1:" in err and "modified" in err
    code, _, err = run(capsys, "audit", "verify", log_path, "--anchor", "x")
    assert code == 2 and "SEQ:HASH" in err


def test_audit_verify_says_what_a_chain_without_an_anchor_cannot_show(
    tmp_path: Path, capsys
) -> None:
    """Issue 19, point 10: a log rewritten with recomputed hashes printed "chain intact"
    when no anchor was given, and a swap of two entries was called a deletion."""
    log_path = tmp_path / "audit.jsonl"
    with AuditLog.open(log_path) as log:
        for number in range(1, 5):
            log.append("round-opened", {"study_id": "s", "round": number})
        anchor = log.anchor().to_text()
    lines = log_path.read_bytes().splitlines(keepends=True)

    # Rewritten from entry 2 on, every hash recomputed: an unbroken chain of other content.
    forged, previous = [lines[0]], json.loads(lines[0])["hash"]
    for line in lines[1:]:
        obj = json.loads(line)
        obj["fields"]["round"] += 100
        obj["prev_hash"] = previous
        del obj["hash"]
        obj["hash"] = previous = entry_hash(**obj)
        forged.append(canonical_json(obj) + b"\n")
    rewritten = tmp_path / "rewritten.jsonl"
    rewritten.write_bytes(b"".join(forged))
    code, out, _ = run(capsys, "audit", "verify", rewritten)
    assert code == 0 and "chain intact" not in out
    assert "not shown without --anchor" in out and "rewritten" in out and "cut off" in out
    code, _, err = run(capsys, "audit", "verify", rewritten, "--anchor", anchor)
    assert code == 2 and "rewritten" in err

    # Two entries swapped: a reorder, not a deletion.
    swapped = tmp_path / "swapped.jsonl"
    swapped.write_bytes(b"".join([lines[0], lines[2], lines[1], lines[3]]))
    code, _, err = run(capsys, "audit", "verify", swapped)
    assert code == 2 and "line 2:" in err and "entry 2 is at line 3" in err
    assert "reordered" in err and "deleted" not in err
