"""The node's configuration: the broker settings a site may tune (TOML plus TESSERA_*)."""

from __future__ import annotations

import pytest

from node.config import node_config_from_mapping
from tessera.errors import ConfigError

DOCUMENT = {"site_id": "site-a", "bundle_dir": "/etc/tessera/bundle", "study_id": "study-1"}


def test_the_publish_timeout_and_reconnect_wait_are_settings() -> None:
    default = node_config_from_mapping(DOCUMENT, {})
    assert (default.broker.publish_timeout_s, default.broker.reconnect_max_s) == (300.0, 30.0)
    env = {"TESSERA_BROKER_PUBLISH_TIMEOUT_S": "5", "TESSERA_BROKER_RECONNECT_MAX_S": "2"}
    tuned = node_config_from_mapping(DOCUMENT, env)
    assert (tuned.broker.publish_timeout_s, tuned.broker.reconnect_max_s) == (5.0, 2.0)


@pytest.mark.parametrize(
    ("key", "value"), [("publish_timeout_s", 0.5), ("reconnect_max_s", float("nan"))]
)
def test_a_bad_broker_setting_names_the_key(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"broker.{key}.*1 s or more"):
        node_config_from_mapping({**DOCUMENT, "broker": {key: value}}, {})
