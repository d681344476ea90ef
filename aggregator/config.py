"""The aggregator service's configuration: one frozen, validated dataclass.

Built once at the command-line edge from a TOML file plus environment overrides, then passed
down explicitly. An override is named after its key: `TESSERA_<KEY>` for a top-level key,
`TESSERA_<SECTION>_<KEY>` for a key in a section (`TESSERA_BROKER_HOST`,
`TESSERA_ROUND_MIN_PARTICIPANTS`). Every error names the key, the value and the fix.

```toml
aggregator_id = "agg-1"
federation_id = "fed-1"
study_id = "study-1"
leader_id = "agg-1"
manifest = "/etc/tessera/bundle/manifest.json"
signing_key = "/etc/tessera/bundle/agg-1.signing.pem"
hpke_key = "/etc/tessera/bundle/agg-1.hpke.pem"

[broker]
host = "broker.example.org"

[round]
min_participants = 3

[strategy]
optimizer = "fedadam"
```
"""

from __future__ import annotations

import math
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from aggregator.errors import AggregatorConfigError, StrategyError
from aggregator.strategies import ALGORITHMS, OPTIMIZERS, PolicyConfig, StrategyConfig
from tessera.update_layout import DEFAULT_LOSS_CAP

ENV_PREFIX = "TESSERA_"


@dataclass(frozen=True)
class BrokerSettings:
    """How to reach the MQTT broker (mutual TLS)."""

    host: str = "localhost"
    port: int = 8883
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    tls: bool = True

    def __post_init__(self) -> None:
        _check(0 < self.port < 65536, "broker.port", self.port, "use a TCP port, 1-65535")
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
    max_rounds: int = 0  # 0: keep opening rounds
    algorithm: str = "fedavg"  # the first round's; the adaptive policy may change it
    local_epochs: int = 1
    learning_rate: float = 0.01
    prox_mu: float = 0.0
    clip_norm: float = 1.0
    loss_cap: float = DEFAULT_LOSS_CAP  # nodes clip the validation loss they report to this
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
            "learning_rate",
            "clip_norm",
            "loss_cap",
        ):
            value = getattr(self, name)
            _check(math.isfinite(value) and value > 0, f"round.{name}", value, "use a number > 0")
        _check(8 <= self.frac_bits <= 32, "round.frac_bits", self.frac_bits, "use 8 to 32 bits")
        _check(self.max_rounds >= 0, "round.max_rounds", self.max_rounds, "use 0 or more")
        _check(self.local_epochs >= 1, "round.local_epochs", self.local_epochs, "use 1 or more")
        _check(self.prox_mu >= 0, "round.prox_mu", self.prox_mu, "use 0 (off) or more")
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
    state_dir: Path = Path("/var/lib/tessera")
    http_port: int = 8080
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
        _check(0 < self.http_port < 65536, "http_port", self.http_port, "use 1-65535")

    @property
    def is_leader(self) -> bool:
        """True when this aggregator opens rounds and publishes participant sets."""
        return self.aggregator_id == self.leader_id

    @property
    def database_path(self) -> Path:
        """The SQLite state store."""
        return self.state_dir / "aggregator.sqlite3"

    @property
    def registry_dir(self) -> Path:
        """Where every released model version lives."""
        return self.state_dir / "models"

    @property
    def shares_dir(self) -> Path:
        """Where full-length shares wait until their round ends."""
        return self.state_dir / "shares"


_SECTIONS = {"broker": BrokerSettings, "round": RoundSettings, "strategy": StrategySettings}


def load_config(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> AggregatorConfig:
    """Read `path` (TOML), apply TESSERA_* overrides from `env` (default os.environ), validate."""
    source = Path(path)
    try:
        document = tomllib.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AggregatorConfigError(
            f"configuration file {source} does not exist; pass --config with the right path"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise AggregatorConfigError(
            f"configuration file {source} is not valid TOML: {exc}"
        ) from None
    return config_from_mapping(document, os.environ if env is None else env, str(source))


def config_from_mapping(
    document: Mapping[str, Any], env: Mapping[str, str], origin: str = "the configuration"
) -> AggregatorConfig:
    """Build the config from an already-parsed TOML document plus environment overrides."""
    top = {k: v for k, v in document.items() if k not in _SECTIONS}
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        table = document.get(name, {})
        if not isinstance(table, Mapping):
            raise AggregatorConfigError(f"[{name}] in {origin} must be a table, got {table!r}")
        sections[name] = _build(cls, table, env, f"{name}.", origin)
    config: AggregatorConfig = _build(AggregatorConfig, top, env, "", origin, sections)
    return config


def _build(
    cls: type,
    table: Mapping[str, Any],
    env: Mapping[str, str],
    prefix: str,
    origin: str,
    given: Mapping[str, Any] | None = None,
) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise AggregatorConfigError(
            f"unknown key {prefix}{unknown[0]} in {origin}; known keys here: "
            f"{', '.join(sorted(known - set(given or {})))} (check the spelling)"
        )
    values: dict[str, Any] = dict(given or {})
    for item in fields(cls):
        if item.name in values:
            continue
        key = f"{prefix}{item.name}"
        env_name = ENV_PREFIX + key.replace(".", "_").upper()
        if env_name in env:
            values[item.name] = _coerce(env[env_name], hints[item.name], key, env_name)
        elif item.name in table:
            values[item.name] = _coerce(table[item.name], hints[item.name], key, origin)
        elif item.default is MISSING and item.default_factory is MISSING:
            raise AggregatorConfigError(
                f"required key {key} is missing; add it to {origin} or set {env_name}"
            )
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, AggregatorConfigError):
            raise
        raise AggregatorConfigError(f"{origin}: {exc}") from None


def _coerce(raw: Any, kind: Any, key: str, where: str) -> Any:
    """Convert a TOML value, or an environment string, to the field's type."""
    options = typing.get_args(kind) or (kind,)
    if type(None) in options and raw == "":
        return None  # an empty override clears an optional path
    target = next(t for t in options if t is not type(None))
    value = _convert(raw, target, from_env=where.startswith(ENV_PREFIX))
    if value is None:
        name = getattr(target, "__name__", str(target))
        raise AggregatorConfigError(
            f"{key} = {raw!r} (from {where}) is not a valid {name}; fix it there"
        )
    return value


def _convert(raw: Any, target: type, from_env: bool) -> Any:
    """The converted value, or None when `raw` does not fit `target`."""
    if target is bool:
        if isinstance(raw, bool):
            return raw
        if from_env and isinstance(raw, str):
            words = {
                "1": True,
                "true": True,
                "yes": True,
                "on": True,
                "0": False,
                "false": False,
                "no": False,
                "off": False,
            }
            return words.get(raw.strip().lower())
        return None
    if isinstance(raw, bool):
        return None  # TOML true is not a number
    if target in (int, float):
        if isinstance(raw, int) or (target is float and isinstance(raw, float)):
            return target(raw)
        if from_env and isinstance(raw, str):
            try:
                return target(raw)
            except ValueError:
                return None
        return None
    if target in (str, Path):
        return target(raw) if isinstance(raw, str) and raw else None
    raise AggregatorConfigError(f"configuration type {target} is not supported")  # a bug


def _check(ok: bool, key: str, value: object, fix: str) -> None:
    if not ok:
        raise AggregatorConfigError(f"{key} = {value!r} is invalid; {fix}")
