"""The aggregator service's configuration: one frozen, validated dataclass.

Built once at the command-line edge from a TOML file plus environment overrides, then passed
down explicitly. An override is named after its key: `TESSERA_<KEY>` for a top-level key,
`TESSERA_<SECTION>_<KEY>` for a key in a section (`TESSERA_BROKER_HOST`,
`TESSERA_ROUND_MIN_PARTICIPANTS`). Every error names the key, the value and the fix.

With `bundle_dir` (the startup bundle from `tessera provision`), the federation id, the
leader, both private keys, the broker's address and the TLS files come from the bundle, and
the manifest defaults to `<bundle_dir>/manifest.toml`; a key set in the file still wins.

```toml
aggregator_id = "agg-1"
bundle_dir = "/etc/tessera/bundle"
study_id = "chest-xray"
state_dir = "/var/lib/tessera"

[round]
min_participants = 3

[strategy]
optimizer = "fedadam"
```
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aggregator.errors import AggregatorConfigError, StrategyError
from aggregator.layout import DEFAULT_STATE_DIR, StateLayout
from aggregator.strategies import OPTIMIZERS, PolicyConfig, StrategyConfig
from broker.provisioning.bundle import load_bundle
from tessera.crypto.update_layout import DEFAULT_LOSS_CAP, DEFAULT_WEIGHT_CAP, MAX_LOSS_CAP
from tessera.errors import TesseraError
from tessera.settings import ENV_PREFIX, build_document, check, read_toml
from tessera.wire.messages import ALGORITHMS


@dataclass(frozen=True)
class BrokerSettings:
    """How to reach the MQTT broker (mutual TLS)."""

    host: str = "localhost"
    port: int = 8883
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    tls: bool = True
    # A publish the broker has not acknowledged after this long is logged as stalled; it
    # stays queued and is sent once the broker is back (broker.outbox).
    publish_timeout_s: float = 300.0
    reconnect_max_s: float = 30.0  # the longest wait between two reconnection attempts

    def __post_init__(self) -> None:
        _check(0 < self.port < 65536, "broker.port", self.port, "use a TCP port, 1-65535")
        for name in ("publish_timeout_s", "reconnect_max_s"):
            value = getattr(self, name)
            _check(math.isfinite(value) and value >= 1, f"broker.{name}", value, "use 1 s or more")
        if self.tls:
            for name in ("ca_file", "cert_file", "key_file"):
                _check(
                    getattr(self, name) is not None,
                    f"broker.{name}",
                    None,
                    "TLS is on, so point it at the file from your startup bundle "
                    "(or set broker.tls = false for a local development broker)",
                )


@dataclass(frozen=True)
class RoundSettings:
    """What the leader announces in RoundOpen, and the timing every aggregator keeps."""

    min_participants: int = 3
    collect_timeout_s: float = 600.0
    agreement_timeout_s: float = 120.0
    # Studies that require a privacy audit: how long the sites have to audit a candidate
    # before the release is held for missing reports (an audit trains shadow models).
    audit_timeout_s: float = 1800.0
    max_rounds: int = 0  # 0: as many as the study allows
    pause_s: float = 2.0  # the leader's wait between one round's end and the next RoundOpen
    start_wait_s: float = 60.0  # the leader's wait for every node to come online, once
    algorithm: str = "fedavg"  # the first round's; the adaptive policy may change it
    local_epochs: int = 1
    learning_rate: float = 0.01
    prox_mu: float = 0.0
    clip_norm: float = 1.0
    loss_cap: float = DEFAULT_LOSS_CAP  # nodes clip the validation loss they report to this
    # A node's weight is min(samples, weight_cap) / weight_cap: set it near the largest site's
    # training set, so that small weights keep their fixed-point precision.
    weight_cap: int = DEFAULT_WEIGHT_CAP
    frac_bits: int = 16  # fixed-point precision of the ring encoding

    def __post_init__(self) -> None:
        _check(
            self.min_participants >= 2,
            "round.min_participants",
            self.min_participants,
            "k must be at least 2 so that no round reveals one hospital's update",
        )
        for name in (
            "collect_timeout_s",
            "agreement_timeout_s",
            "audit_timeout_s",
            "learning_rate",
            "clip_norm",
            "loss_cap",
        ):
            value = getattr(self, name)
            _check(math.isfinite(value) and value > 0, f"round.{name}", value, "use a number > 0")
        _check(
            self.loss_cap <= MAX_LOSS_CAP,
            "round.loss_cap",
            self.loss_cap,
            f"use at most {MAX_LOSS_CAP}: nodes and aggregators refuse a round above it",
        )
        _check(8 <= self.frac_bits <= 32, "round.frac_bits", self.frac_bits, "use 8 to 32 bits")
        _check(
            1 <= self.weight_cap < 2**32, "round.weight_cap", self.weight_cap, "use 1 to 2**32-1"
        )
        _check(self.max_rounds >= 0, "round.max_rounds", self.max_rounds, "use 0 or more")
        for name in ("pause_s", "start_wait_s"):
            value = getattr(self, name)
            _check(math.isfinite(value) and value >= 0, f"round.{name}", value, "use 0 or more")
        _check(self.local_epochs >= 1, "round.local_epochs", self.local_epochs, "use 1 or more")
        _check(self.prox_mu >= 0, "round.prox_mu", self.prox_mu, "use 0 (off) or more")
        _check(
            self.learning_rate * self.prox_mu < 1,
            "round.prox_mu",
            self.prox_mu,
            f"keep learning_rate * prox_mu below 1 (each local step pulls the weights that "
            f"fraction back to the round's start), i.e. prox_mu < {1 / self.learning_rate:g}",
        )
        _check(
            self.algorithm in ALGORITHMS,
            "round.algorithm",
            self.algorithm,
            f"use one of {', '.join(ALGORITHMS)}",
        )


@dataclass(frozen=True)
class StrategySettings:
    """The server optimiser and the adaptive policy."""

    optimizer: str = "none"
    adaptive: bool = True
    server_learning_rate: float = 1.0
    adaptive_learning_rate: float = 0.1
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    lower: float = 0.5
    upper: float = 2.0

    def __post_init__(self) -> None:
        _check(
            self.optimizer in OPTIMIZERS,
            "strategy.optimizer",
            self.optimizer,
            f"use one of {', '.join(OPTIMIZERS)}",
        )
        try:
            self.optimizer_config()
            self.policy_config()
        except StrategyError as exc:
            raise AggregatorConfigError(f"[strategy] {exc}") from None

    def optimizer_config(self) -> StrategyConfig:
        """The StrategyConfig the strategy functions take."""
        return StrategyConfig(
            server_learning_rate=self.server_learning_rate,
            adaptive_learning_rate=self.adaptive_learning_rate,
            momentum=self.momentum,
            beta1=self.beta1,
            beta2=self.beta2,
            tau=self.tau,
        )

    def policy_config(self) -> PolicyConfig:
        """The adaptive policy's thresholds."""
        return PolicyConfig(lower=self.lower, upper=self.upper)


@dataclass(frozen=True)
class AggregatorConfig:
    """Everything `tessera aggregator run` needs, validated."""

    aggregator_id: str
    federation_id: str
    study_id: str
    leader_id: str
    manifest: Path
    signing_key: Path
    hpke_key: Path
    state_dir: Path = DEFAULT_STATE_DIR
    bundle_dir: Path | None = None
    architecture: str | None = None  # None: the study's only allowed architecture
    http_port: int = 8080
    log_level: str = "INFO"
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    round: RoundSettings = field(default_factory=RoundSettings)
    strategy: StrategySettings = field(default_factory=StrategySettings)

    def __post_init__(self) -> None:
        for name in ("aggregator_id", "federation_id", "study_id", "leader_id"):
            value = getattr(self, name)
            _check(
                bool(value) and value.isascii() and value.isprintable() and " " not in value,
                name,
                value,
                "use a short ASCII id without spaces, as in the manifest",
            )
        _check(0 <= self.http_port < 65536, "http_port", self.http_port, "use 1-65535 (0: any)")
        _check(
            self.log_level in ("DEBUG", "INFO", "WARNING", "ERROR"),
            "log_level",
            self.log_level,
            "use DEBUG, INFO, WARNING or ERROR",
        )

    @property
    def is_leader(self) -> bool:
        """True when this aggregator opens rounds and publishes participant sets."""
        return self.aggregator_id == self.leader_id

    @property
    def layout(self) -> StateLayout:
        """What lives where under `state_dir` (aggregator.layout)."""
        return StateLayout(self.state_dir)

    @property
    def database_path(self) -> Path:
        """The SQLite state store."""
        return self.layout.database

    @property
    def registry_dir(self) -> Path:
        """Where every released model version lives."""
        return self.layout.registry

    @property
    def shares_dir(self) -> Path:
        """Where full-length shares wait until their round ends."""
        return self.layout.shares


_SECTIONS = {"broker": BrokerSettings, "round": RoundSettings, "strategy": StrategySettings}


def load_config(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> AggregatorConfig:
    """Read `path` (TOML), apply TESSERA_* overrides from `env` (default os.environ), validate."""
    source = Path(path)
    document = read_toml(source, AggregatorConfigError)
    return config_from_mapping(document, os.environ if env is None else env, str(source))


def config_from_mapping(
    document: Mapping[str, Any], env: Mapping[str, str], origin: str = "the configuration"
) -> AggregatorConfig:
    """Build the config from an already-parsed TOML document plus environment overrides."""
    document = _with_bundle_defaults(document, env, origin)
    config: AggregatorConfig = build_document(
        AggregatorConfig, _SECTIONS, document, env, origin, error=AggregatorConfigError
    )
    return config


def _with_bundle_defaults(
    document: Mapping[str, Any], env: Mapping[str, str], origin: str
) -> Mapping[str, Any]:
    """The document with every key the startup bundle answers filled in where it is unset."""
    raw = env.get(ENV_PREFIX + "BUNDLE_DIR", document.get("bundle_dir"))
    if not raw:
        return document
    folder = Path(str(raw))
    try:
        bundle = load_bundle(folder)
    except TesseraError as exc:
        raise AggregatorConfigError(
            f"bundle_dir = {str(folder)!r} (from {origin}): {exc}"
        ) from None
    if bundle.role != "aggregator":
        raise AggregatorConfigError(
            f"bundle {folder} is {bundle.member_id!r}'s, a {bundle.role}; mount the "
            "aggregator's own bundle"
        )
    named = env.get(ENV_PREFIX + "AGGREGATOR_ID", document.get("aggregator_id"))
    if named is not None and named != bundle.member_id:
        raise AggregatorConfigError(
            f"aggregator_id = {named!r} but bundle {folder} belongs to {bundle.member_id!r}"
        )
    defaults: dict[str, Any] = {
        "aggregator_id": bundle.member_id,
        "federation_id": bundle.federation_id,
        "leader_id": bundle.roster.leader,
        "manifest": str(folder / "manifest.toml"),
        "signing_key": str(folder / "signing.key"),
        "hpke_key": str(folder / "hpke.key"),
    }
    broker_defaults = {
        "host": bundle.hostnames[0] if bundle.hostnames else "localhost",
        "port": bundle.mqtt_port,
        "ca_file": str(bundle.tls_files.ca_file),
        "cert_file": str(bundle.tls_files.cert_file),
        "key_file": str(bundle.tls_files.key_file),
    }
    merged = {**defaults, **document}
    broker = document.get("broker", {})
    if isinstance(broker, Mapping):
        merged["broker"] = {**broker_defaults, **broker}
    return merged


def _check(ok: bool, key: str, value: object, fix: str) -> None:
    check(ok, key, value, fix, AggregatorConfigError)
