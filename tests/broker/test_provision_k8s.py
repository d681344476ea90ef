"""`tessera provision --k8s`: Secrets from the bundles, in the namespaces the overlays use."""

from __future__ import annotations

import base64
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.deploy import K8S, KUBERNETES_VERSION, OVERLAYS, VENV_BIN, pod_specs, run

from broker.errors import ProvisioningError
from broker.provisioning.federation import load_federation
from broker.provisioning.k8s_secrets import member_namespace, render_secret
from tessera.cli import main

EXAMPLE = K8S.parent / "broker" / "examples" / "FEDERATION.toml"
MEMBERS = ("site-a", "site-b", "site-c", "agg-uni", "agg-ngo")


def tool(path: Path | str | None, install: str) -> str:
    """The executable's path, or fail saying how to install it (never skip)."""
    if path is None or not Path(path).is_file():
        pytest.fail(f"{path or 'tool'} not found: {install}")
    return str(path)


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example federation provisioned through the real CLI with --k8s."""
    folder = tmp_path_factory.mktemp("k8s") / "provisioned"
    assert main(["provision", str(EXAMPLE), "--out", str(folder), "--k8s"]) == 0
    return folder


def secret(path: Path) -> dict[str, Any]:
    """The one YAML document of a written Secret file."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert len(docs) == 1, f"{path} holds {len(docs)} documents"
    return docs[0]


def test_one_secret_file_per_member_and_one_for_the_broker(out: Path) -> None:
    names = sorted(p.name for p in (out / "k8s").iterdir())
    assert names == sorted([f"{m}.yaml" for m in MEMBERS] + ["broker.yaml"])


@pytest.mark.parametrize("member", MEMBERS)
def test_bundle_secret_round_trips_every_bundle_file(out: Path, member: str) -> None:
    doc = secret(out / "k8s" / f"{member}.yaml")
    assert (doc["apiVersion"], doc["kind"], doc["type"]) == ("v1", "Secret", "Opaque")
    assert doc["metadata"]["name"] == "tessera-bundle"
    assert doc["metadata"]["namespace"] == f"tessera-{member}"
    assert "stringData" not in doc
    bundle = {p.name: p.read_bytes() for p in (out / "bundles" / member).iterdir()}
    assert {"client.key", "signing.key", "roster.json"} <= set(bundle)
    assert ("hpke.key" in bundle) == member.startswith("agg-")
    decoded = {key: base64.b64decode(value, validate=True) for key, value in doc["data"].items()}
    assert decoded == bundle


def test_broker_tls_secret_holds_the_broker_files(out: Path) -> None:
    doc = secret(out / "k8s" / "broker.yaml")
    assert doc["kind"] == "Secret" and doc["type"] == "Opaque"
    assert doc["metadata"] == {**doc["metadata"], "name": "tessera-broker-tls"}
    assert doc["metadata"]["namespace"] == "tessera-broker"
    decoded = {key: base64.b64decode(value, validate=True) for key, value in doc["data"].items()}
    names = ("ca.pem", "server.pem", "server.key", "crl.pem")
    assert decoded == {name: (out / "broker" / name).read_bytes() for name in names}


def test_secret_files_are_private(out: Path) -> None:
    assert stat.S_IMODE((out / "k8s").stat().st_mode) == 0o700
    for path in (out / "k8s").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_kubernetes_validate_accepts_the_secrets_strictly(out: Path, tmp_path: Path) -> None:
    validator = tool(VENV_BIN / "kubernetes-validate", "pip install kubernetes-validate")
    files = sorted(str(p) for p in (out / "k8s").iterdir())
    result = run(validator, "--strict", "-k", KUBERNETES_VERSION, "--quiet", *files)
    assert result.returncode == 0, result.stdout + result.stderr
    # The validator does check Secrets: a misspelt field fails.
    bad = tmp_path / "bad.yaml"
    bad.write_text((out / "k8s" / "site-a.yaml").read_text().replace("data:", "datta:"))
    result = run(validator, "--strict", "-k", KUBERNETES_VERSION, "--quiet", str(bad))
    assert result.returncode != 0


def mounted_secrets(docs: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    """(namespace, Secret name) -> the keys its items name, for every Secret a pod mounts."""
    found: dict[tuple[str, str], set[str]] = {}
    workloads = {d["metadata"]["name"]: d["metadata"]["namespace"] for d in docs if "spec" in d}
    for name, pod in pod_specs(docs):
        for volume in pod.get("volumes", []):
            sources = [volume, *volume.get("projected", {}).get("sources", [])]
            for source in sources:
                ref = source.get("secret")
                if ref is None:
                    continue
                key = (workloads[name], ref.get("secretName") or ref["name"])
                found.setdefault(key, set()).update(i["key"] for i in ref.get("items", []))
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_secret_an_overlay_mounts_is_written(out: Path, overlay: str) -> None:
    kubectl = tool(shutil.which("kubectl"), "install kubectl >= 1.27 (kustomize v5) on PATH")
    result = run(kubectl, "kustomize", str(K8S / "overlays" / overlay))
    assert result.returncode == 0, result.stderr
    wanted = mounted_secrets([d for d in yaml.safe_load_all(result.stdout) if d])
    assert wanted, f"{overlay} mounts no Secret"
    written = {}
    for path in (out / "k8s").iterdir():
        doc = secret(path)
        written[doc["metadata"]["namespace"], doc["metadata"]["name"]] = set(doc["data"])
    for (namespace, name), keys in wanted.items():
        assert (namespace, name) in written, f"{overlay} mounts {namespace}/{name}; not written"
        assert keys <= written[namespace, name]


def test_a_secret_file_is_a_kustomize_resource_beside_the_overlay(
    out: Path, tmp_path: Path
) -> None:
    kubectl = tool(shutil.which("kubectl"), "install kubectl >= 1.27 (kustomize v5) on PATH")
    shutil.copy(out / "k8s" / "site-a.yaml", tmp_path / "site-a.yaml")
    (tmp_path / "kustomization.yaml").write_text(
        # Kustomize takes a base only by a relative path.
        f"resources:\n  - {os.path.relpath(K8S / 'overlays' / 'site-a', tmp_path)}\n"
        "  - site-a.yaml\n"
    )
    result = run(kubectl, "kustomize", str(tmp_path))
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    secrets = [d for d in docs if d["kind"] == "Secret"]
    assert [(s["metadata"]["namespace"], s["metadata"]["name"]) for s in secrets] == [
        ("tessera-site-a", "tessera-bundle")
    ]
    assert mounted_secrets(docs) == {("tessera-site-a", "tessera-bundle"): set()}
    # Private keys travel only in the Secret, never in a ConfigMap.
    key = secrets[0]["data"]["client.key"]
    assert all(key not in str(d) for d in docs if d["kind"] == "ConfigMap")


def test_without_k8s_no_secrets_are_written(tmp_path: Path) -> None:
    assert main(["provision", str(EXAMPLE), "--out", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "bundles" / "site-a" / "client.key").is_file()
    assert not (tmp_path / "p" / "k8s").exists()


def test_reprovisioning_refreshes_the_secrets(out: Path, tmp_path: Path) -> None:
    copy = tmp_path / "p"
    shutil.copytree(out, copy)
    before = secret(copy / "k8s" / "site-a.yaml")["data"]["roster.json"]
    argv = ["provision", str(EXAMPLE), "--out", str(copy), "--reuse-ca", "--k8s"]
    assert main(argv) == 0
    after = secret(copy / "k8s" / "site-a.yaml")["data"]
    assert after["roster.json"] != before
    assert base64.b64decode(after["roster.json"]) == (copy / "roster.json").read_bytes()


@pytest.mark.parametrize(
    ("member_id", "expected"),
    [("site-a", "tessera-site-a"), ("agg-uni", "tessera-agg-uni"), ("h1", "tessera-h1")],
)
def test_namespace_is_tessera_dash_member_id(member_id: str, expected: str) -> None:
    assert member_namespace(member_id) == expected


@pytest.mark.parametrize("member_id", ["Site-A", "site_a", "site.a", "site-", "x" * 56, "broker"])
def test_an_id_that_makes_no_namespace_is_refused_before_writing(
    member_id: str, tmp_path: Path
) -> None:
    with pytest.raises(ProvisioningError, match=repr(member_id)):
        member_namespace(member_id)
    toml = EXAMPLE.read_text().replace('id = "site-c"', f'id = "{member_id}"')
    federation = tmp_path / "FEDERATION.toml"
    federation.write_text(toml)
    assert member_id in {m.id for m in load_federation(federation).members}
    assert main(["provision", str(federation), "--out", str(tmp_path / "p"), "--k8s"]) == 2
    assert not (tmp_path / "p").exists()


def test_a_secret_over_the_kubernetes_limit_is_refused() -> None:
    annotations = {"tessera.io/federation": "demo-fed"}
    text = render_secret("tessera-bundle", "tessera-site-a", {"a": b"x" * 1000}, annotations)
    assert base64.b64decode(yaml.safe_load(text)["data"]["a"]) == b"x" * 1000
    with pytest.raises(ProvisioningError, match="1 MiB"):
        render_secret("tessera-bundle", "tessera-site-a", {"a": b"x" * (800 << 10)}, annotations)
