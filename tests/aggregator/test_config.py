"""The aggregator's configuration: TOML plus TESSERA_* overrides, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from aggregator.config import AggregatorConfig, load_config
from aggregator.errors import AggregatorConfigError
from tessera.errors import ConfigError

MINIMAL = """
aggregator_id = "agg-1"
federation_id = "fed-1"
study_id = "study-1"
leader_id = "agg-1"
manifest = "/etc/tessera/bundle/manifest.json"
signing_key = "/etc/tessera/bundle/agg-1.signing.pem"
hpke_key = "/etc/tessera/bundle/agg-1.hpke.pem"

[broker]
host = "broker.test"
ca_file = "/etc/tessera/bundle/ca.pem"
cert_file = "/etc/tessera/bundle/agg-1.crt"
key_file = "/etc/tessera/bundle/agg-1.key"

[round]
min_participants = 3
learning_rate = 0.05

[strategy]
optimizer = "fedadam"
lower = 0.25
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "aggregator.toml"
    path.write_text(text)
    return path


def test_a_minimal_file_loads_with_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL), env={})
    assert isinstance(config, AggregatorConfig)
    assert config.is_leader and config.broker.port == 8883
    assert config.round.learning_rate == 0.05 and config.round.algorithm == "fedavg"
    assert config.strategy.optimizer_config().adaptive_learning_rate == 0.1
    assert config.strategy.policy_config().lower == 0.25
    assert config.database_path == Path("/var/lib/tessera/aggregator.sqlite3")
    with pytest.raises(AttributeError):
        config.study_id = "other"  # type: ignore[misc]


def test_environment_overrides_win(tmp_path: Path) -> None:
    env = {
        "TESSERA_LEADER_ID": "agg-2",
        "TESSERA_ROUND_MIN_PARTICIPANTS": "5",
        "TESSERA_STRATEGY_ADAPTIVE": "off",
        "TESSERA_BROKER_TLS": "false",
        "TESSERA_BROKER_CA_FILE": "",
        "TESSERA_STATE_DIR": str(tmp_path),
        "TESSERA_UNRELATED": "ignored",
    }
    config = load_config(write(tmp_path, MINIMAL), env=env)
    assert not config.is_leader
    assert config.round.min_participants == 5
    assert config.strategy.adaptive is False
    assert config.broker.tls is False and config.broker.ca_file is None
    assert config.state_dir == tmp_path
    assert config.broker.publish_timeout_s == 300.0  # the default


def test_the_publish_timeout_and_reconnect_wait_are_settings(tmp_path: Path) -> None:
    env = {"TESSERA_BROKER_PUBLISH_TIMEOUT_S": "5", "TESSERA_BROKER_RECONNECT_MAX_S": "2"}
    config = load_config(write(tmp_path, MINIMAL), env=env)
    assert (config.broker.publish_timeout_s, config.broker.reconnect_max_s) == (5.0, 2.0)


@pytest.mark.parametrize(
    ("edit", "env", "message"),
    [
        (lambda t: t.replace('leader_id = "agg-1"\n', ""), {}, "leader_id.*TESSERA_LEADER_ID"),
        (lambda t: t.replace("min_participants = 3", "min_participants = 1"), {}, "min_partic"),
        (lambda t: t.replace("min_participants = 3", 'min_participants = "3"'), {}, "not a val"),
        (lambda t: t.replace("[round]", "[round]\nlocal_epoch = 2"), {}, "round.local_epoch"),
        (lambda t: t.replace('"fedadam"', '"adamw"'), {}, "strategy.optimizer"),
        (lambda t: t.replace("lower = 0.25", "lower = 9.0"), {}, r"\[strategy\].*lower"),
        (lambda t: t, {"TESSERA_ROUND_LEARNING_RATE": "fast"}, "TESSERA_ROUND_LEARNING_RATE"),
        (
            lambda t: t,
            {"TESSERA_ROUND_LEARNING_RATE": "0.5", "TESSERA_ROUND_PROX_MU": "2"},
            r"round.prox_mu.*prox_mu < 2",
        ),
        (lambda t: t.replace('key_file = "/etc/tessera/bundle/agg-1.key"\n', ""), {}, "key_f"),
        (lambda t: t + "\n[round2]\n", {}, "round2"),
        (lambda t: t.replace('"agg-1"', '"agg 1"', 1), {}, "aggregator_id"),
        (lambda t: t, {"TESSERA_BROKER_PUBLISH_TIMEOUT_S": "0"}, "broker.publish_timeout_s"),
        (lambda t: t, {"TESSERA_BROKER_RECONNECT_MAX_S": "inf"}, "broker.reconnect_max_s"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(tmp_path: Path, edit, env, message: str) -> None:
    with pytest.raises(AggregatorConfigError, match=message) as caught:
        load_config(write(tmp_path, edit(MINIMAL)), env=env)
    assert isinstance(caught.value, ConfigError)


def test_missing_and_malformed_files_are_clear(tmp_path: Path) -> None:
    with pytest.raises(AggregatorConfigError, match="--config"):
        load_config(tmp_path / "nope.toml", env={})
    with pytest.raises(AggregatorConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "aggregator_id = "), env={})
