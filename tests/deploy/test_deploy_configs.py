"""The service configurations shipped in docker/config and the k8s overlays load with the
daemons' own loaders: a key the daemon does not know, or a missing one, fails here."""

from __future__ import annotations

import getpass
from pathlib import Path

import pytest

from aggregator.config import config_from_mapping
from broker.provisioning.federation import parse_federation
from broker.provisioning.provision import provision
from node.config import load_node_config
from tessera.errors import ConfigError
from tessera.settings import read_toml

ROOT = Path(__file__).resolve().parents[2]
NODE_CONFIGS = sorted(ROOT.glob("docker/config/site-*.toml")) + sorted(
    ROOT.glob("k8s/overlays/*/node.toml")
)
AGGREGATOR_CONFIGS = sorted(ROOT.glob("docker/config/agg-*.toml")) + sorted(
    ROOT.glob("k8s/overlays/*/aggregator.toml")
)


def test_every_shipped_configuration_is_found() -> None:
    assert len(NODE_CONFIGS) >= 5 and len(AGGREGATOR_CONFIGS) >= 4


@pytest.mark.parametrize("path", NODE_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_node_configurations_load(path: Path) -> None:
    env = {}
    if "k8s" in path.parts:
        # The k8s base exposes C-STORE on 11112, so the receiver is on, and it ships with a
        # placeholder allow-list that stops the node until the site names its PACS.
        with pytest.raises(ConfigError, match=r"receiver\.allowed_calling_aets.*placeholder"):
            load_node_config(path, env={})
        env = {"TESSERA_RECEIVER_ALLOWED_CALLING_AETS": "PACS1"}
    config = load_node_config(path, env=env)
    assert config.bundle_dir == Path("/etc/tessera/bundle")
    assert config.state_dir == Path("/var/lib/tessera") and config.http_port == 8080
    assert config.manifest_path == Path("/etc/tessera/bundle/manifest.toml")
    if "k8s" in path.parts:  # something must listen on the port the base exposes
        assert config.receiver.enabled and config.receiver.port == 11112
        assert config.receiver.host == "0.0.0.0"


@pytest.mark.parametrize("path", AGGREGATOR_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_aggregator_configurations_load_with_their_bundle(path: Path, tmp_path: Path) -> None:
    document = read_toml(path)
    member = document["aggregator_id"]
    federation = parse_federation(
        {
            "federation": {"id": "demo-fed", "leader": "agg-uni", "studies": ["chest-xray"]},
            "sites": [{"id": "site-a", "name": "A"}],
            "aggregators": [{"id": "agg-uni", "name": "U"}, {"id": "agg-ngo", "name": "N"}],
        }
    )
    provision(federation, tmp_path, run_as_user=getpass.getuser())
    bundle = tmp_path / "bundles" / member
    config = config_from_mapping(document, {"TESSERA_BUNDLE_DIR": str(bundle)}, str(path))
    assert config.aggregator_id == member and config.leader_id == "agg-uni"
    assert config.signing_key == bundle / "signing.key" and config.broker.ca_file is not None


def test_a_misspelt_key_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "node.toml"
    bad.write_text(NODE_CONFIGS[0].read_text() + 'sutdy = "x"\n')
    with pytest.raises(ValueError, match="unknown key sutdy"):
        load_node_config(bad, env={})
