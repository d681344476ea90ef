"""Paths, tool runner and manifest helpers for the deployment checks (tests/deploy)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
K8S = REPO / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
DOCKERFILES = sorted(p.name for p in DOCKER.glob("*.Dockerfile"))
# The Kubernetes version the manifests are validated against (kubectl in CI is 1.32).
KUBERNETES_VERSION = "1.32.0"
VENV_BIN = Path(sys.executable).parent


def run(*argv: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a tool; never raises on a non-zero exit (the tests assert on it)."""
    return subprocess.run(argv, capture_output=True, text=True, input=input, timeout=120)


def documents(path: Path) -> list[dict[str, Any]]:
    """The YAML documents of one rendered overlay."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(workload name, pod spec) for every workload in the documents."""
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]
