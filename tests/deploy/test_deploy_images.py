"""Dockerfiles (hadolint plus the image rules) and the compose federation (Compose v2)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.deploy import DOCKER, DOCKERFILES, REPO, run

PYTHON_IMAGES = ["node.Dockerfile", "node-gpu.Dockerfile", "aggregator.Dockerfile"]
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (DOCKER / name).read_text()
    text = re.sub(
        r"\\\n", " ", "\n".join(x for x in text.splitlines() if not x.lstrip().startswith("#"))
    )
    pairs = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def test_every_image_has_a_dockerfile() -> None:
    assert DOCKERFILES == sorted(
        ["aggregator.Dockerfile", "broker.Dockerfile", "node-gpu.Dockerfile", "node.Dockerfile"]
    )


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_passes(hadolint: str, name: str) -> None:
    result = run(hadolint, str(DOCKER / name))
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_a_bad_dockerfile(hadolint: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get install curl\n")
    result = run(hadolint, str(bad))
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # the :latest tag


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_rules(name: str) -> None:
    steps = instructions(name)
    froms = [args for kind, args in steps if kind == "FROM"]
    assert len(froms) >= 2, "multi-stage: a build stage and a runtime stage"
    declared = {
        args.split("=")[0]
        for kind, args in steps[: steps.index(("FROM", froms[0]))]
        if kind == "ARG"
    }
    for base in froms:
        image = base.split()[0]
        assert image.startswith("${") and image[2:-1] in declared, (
            f"base image {image} is not a build ARG"
        )
    runtime = steps[[i for i, s in enumerate(steps) if s[0] == "FROM"][-1] :]
    users = [args for kind, args in runtime if kind == "USER"]
    assert users and re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", users[-1]), "numeric non-root USER"
    assert any(kind == "HEALTHCHECK" and "CMD" in args for kind, args in runtime)
    labels = " ".join(args for kind, args in runtime if kind == "LABEL")
    for key in ("title", "description", "version", "revision", "licenses", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels
    assert (DOCKER / f"{name}.dockerignore").is_file(), "a per-Dockerfile ignore file"


def base_image_args(name: str) -> dict[str, str]:
    """{ARG: default ("" when none)} for the ARGs the Dockerfile's FROM lines name."""
    steps = instructions(name)
    first_from = next(i for i, (kind, _) in enumerate(steps) if kind == "FROM")
    declared = dict(
        args.partition("=")[::2] for kind, args in steps[:first_from] if kind == "ARG"
    )
    bases = {args.split()[0][2:-1] for kind, args in steps if kind == "FROM"}
    return {arg: declared[arg] for arg in bases}


def digest_guard(name: str, arg: str) -> str:
    """The RUN that refuses a base image given without a digest (for an ARG with no default)."""
    guards = [a for kind, a in instructions(name) if kind == "RUN" and f'"${{{arg}}}"' in a]
    assert guards, f"{name}: {arg} has no default and no RUN that checks it for a digest"
    return guards[0]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_images_are_pinned_by_digest(name: str) -> None:
    """A default base image carries its digest; one without a default must be passed, and a
    RUN in the build refuses it without a digest (the README gives the command that prints
    one: docker buildx imagetools inspect <image:tag>)."""
    for arg, default in base_image_args(name).items():
        if default:
            assert DIGEST.search(default), f"{name}: {arg}={default} is not pinned by digest"
            continue
        guard = digest_guard(name, arg)
        for value, refused in (("nvidia/cuda:12.8.1-base-ubuntu24.04", True),
                               (f"nvidia/cuda:12.8.1-base-ubuntu24.04@sha256:{'ab' * 32}", False),
                               ("", True)):  # fmt: skip
            ran = subprocess.run(["sh", "-c", guard], env={arg: value}, capture_output=True,
                                 text=True, timeout=60)  # fmt: skip
            assert (ran.returncode != 0) == refused, (value, ran.stderr)
            if refused:
                assert "imagetools inspect" in ran.stderr


@pytest.mark.parametrize("name", PYTHON_IMAGES)
def test_python_images_are_read_only_friendly_and_pin_torch(name: str) -> None:
    text = (DOCKER / name).read_text()
    assert "PYTHONDONTWRITEBYTECODE=1" in text
    assert "HOME=/var/lib/tessera" in text and "TMPDIR=/tmp" in text
    assert "COPY --from=builder /opt/tessera /opt/tessera" in text
    assert "ARG TORCH_VERSION=2.13.0" in text and '"torch==${TORCH_VERSION}"' in text
    index = re.search(r"ARG TORCH_INDEX_URL=(\S+)", text)
    assert index is not None
    expected = "/whl/cu" if "gpu" in name else "/whl/cpu"
    assert expected in index.group(1)
    assert "curl" not in text  # the health check uses the image's own Python


def test_ignore_files_keep_state_and_secrets_out_of_the_context() -> None:
    for name in PYTHON_IMAGES:
        text = (DOCKER / f"{name}.dockerignore").read_text()
        lines = [x for x in text.splitlines() if x and not x.startswith("#")]
        assert lines[0] == "*", "deny everything first, then allow-list"
        allowed = {x[1:].rstrip("/") for x in lines if x.startswith("!")}
        assert allowed == {"pyproject.toml", "README.md", "tessera", "node", "aggregator", "broker"}


def compose(binary: str, path: Path, *args: str) -> object:
    return run(binary, "-f", str(path), "--project-directory", str(path.parent), *args)


def test_compose_file_validates(compose_binary: str) -> None:
    result = compose(compose_binary, DOCKER / "compose.yaml", "config", "-q")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "breakage",
    [
        ("  read_only: true", "  read_only: maybe"),  # wrong type
        ("      condition: service_healthy", "      condition: service_sunny"),  # bad enum
        ("  site-c:\n", "  site-c:\n    no_such_key: 1\n"),  # unknown property
    ],
)
def test_a_broken_compose_file_fails(
    compose_binary: str, tmp_path: Path, breakage: tuple[str, str]
) -> None:
    text = (DOCKER / "compose.yaml").read_text()
    old, new = breakage
    assert old in text
    broken = tmp_path / "compose.yaml"
    broken.write_text(text.replace(old, new, 1))
    result = compose(compose_binary, broken, "config", "-q")
    assert result.returncode != 0


def test_compose_federation_is_hardened(compose_binary: str) -> None:
    result = compose(compose_binary, DOCKER / "compose.yaml", "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert sorted(services) == ["agg-ngo", "agg-uni", "broker", "site-a", "site-b", "site-c"]
    for name, service in services.items():
        assert service["read_only"] is True, name
        assert not service["user"].startswith("0"), name
        assert service["cap_drop"] == ["ALL"], name
        assert any(t.startswith("/tmp") for t in service["tmpfs"]), name
        assert service["healthcheck"]["test"][0] == "CMD", name
        if name != "broker":
            assert service["depends_on"]["broker"]["condition"] == "service_healthy", name
            mounts = {v["target"]: v for v in service["volumes"]}
            assert mounts["/var/lib/tessera"]["type"] == "volume", name
            assert mounts["/etc/tessera/bundle"]["read_only"] is True, name
            (config,) = [m for target, m in mounts.items() if target.endswith(".toml")]
            assert config["read_only"] is True and Path(config["source"]).is_file(), name
    for site in ("site-a", "site-b", "site-c"):
        mounts = {v["target"]: v for v in services[site]["volumes"]}
        assert mounts["/data/dicom"]["read_only"] is True
        # The hospital's HTTP endpoints are published on loopback only.
        assert all(p["host_ip"] == "127.0.0.1" for p in services[site]["ports"])
        assert {p["target"] for p in services[site]["ports"]} == {8080, 8443}
        # Inference's TLS certificate, key and token hash are the site's own secrets.
        secrets = {s["target"]: s["source"] for s in services[site]["secrets"]}
        assert set(secrets) == {"inference-tls.crt", "inference-tls.key", "inference-token.sha256"}
        assert all(source.startswith(f"{site}-") for source in secrets.values())


def test_compose_images_match_the_dockerfiles() -> None:
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    built = {s["build"]["dockerfile"] for s in services.values() if "build" in s}
    assert built <= {f"docker/{name}" for name in DOCKERFILES}
    assert all((REPO / path).is_file() for path in built)
