"""Shared fixtures for the node tests: small synthetic hospitals, written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.synth.sites import SynthConfig, generate


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five sites (one per scanner profile) of 12 small images each; treat as read-only."""
    root = tmp_path_factory.mktemp("synth")
    generate(SynthConfig(root, sites=5, seed=11, images_per_site=12, size=32))
    return root
