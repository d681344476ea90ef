"""`tessera node run`'s configuration: one frozen, validated dataclass from TOML plus
`TESSERA_*` overrides (`tessera.settings`), every error naming the key and the fix.

```toml
site_id = "site-a"
bundle_dir = "/etc/tessera/bundle"      # the startup bundle from `tessera provision`
study_id = "chest-xray"
state_dir = "/var/lib/tessera"          # cache, models, ledger, audit log (a volume)
dicom_dir = "/data/dicom"               # optional: ingested at start and before each round
labels_csv = "/data/labels.csv"         # optional: labels by SOP/Study UID or accession
http_port = 8080                        # /healthz /readyz /metrics and POST /v1/infer
max_clock_skew_s = 900                  # tolerated offset from the leader's clock (measured)

[training]
noise_multiplier = 1.1                  # DP-SGD: every study requires it

[privacy_audit]                         # used only by studies that require an audit
shadow_models = 8                       # even, 2-64: the LiRA shadows, trained here

[receiver]                              # optional: a PACS pushes studies by C-STORE
enabled = true                          # objects land in <state_dir>/received, then intake
host = "10.0.5.20"                      # default 127.0.0.1: the PACS needs a LAN address
port = 11112
ae_title = "TESSERA"
allowed_calling_aets = "PACS1,PACS2"    # required: every other calling AE title is rejected
allowed_addresses = "10.0.5.0/24"       # optional: only from these addresses
tls_cert = "/etc/tessera/dicom.pem"     # optional DICOM TLS (with tls_key, tls_client_ca)
quota_mib = 4096                        # objects waiting for intake; max_object_mib = 1024
retention_hours = 0                     # delete each original once cached or quarantined
```

Defaults that follow the bundle: the manifest is `<bundle_dir>/manifest.toml`, the
steward's approvals are the `*.json` files in `<bundle_dir>/approvals/`, and without a
`policy` file the site policy is the study's terms alone (no stricter local rules). A
policy file, where given, is re-read before every round, so its `paused = true` takes
effect at the next RoundOpen without a restart.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.privacy.attacks import AuditConfig
from node.training.trainer import DPSettings
from tessera.errors import ConfigError
from tessera.limits import (
    RECEIVER_MAX_ASSOCIATIONS,
    RECEIVER_MAX_OBJECT_BYTES,
    RECEIVER_QUOTA_BYTES,
)
from tessera.settings import build_document, check, read_toml

if TYPE_CHECKING:
    from node.intake.receiver import ReceiverConfig


@dataclass(frozen=True)
class BrokerEndpointSettings:
    """The broker's address; unset values come from the bundle. `tls = false` is only for
    the local development broker."""

    host: str | None = None
    port: int | None = None
    tls: bool = True
    # A publish the broker has not acknowledged after this long is logged as stalled; it
    # stays queued and is sent once the broker is back (broker.outbox).
    publish_timeout_s: float = 300.0
    reconnect_max_s: float = 30.0  # the longest wait between two reconnection attempts

    def __post_init__(self) -> None:
        if self.port is not None:
            check(0 < self.port < 65536, "broker.port", self.port, "use a TCP port, 1-65535")
        for name in ("publish_timeout_s", "reconnect_max_s"):
            value = getattr(self, name)
            check(math.isfinite(value) and value >= 1, f"broker.{name}", value, "use 1 s or more")


@dataclass(frozen=True)
class TrainingSettings:
    """What the site decides about its own training (the round decides the rest)."""

    batch_size: int = 32
    device: str = "auto"
    seed: int = 0
    validation_fraction: float = 0.2
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        check(1 <= self.batch_size <= 4096, "training.batch_size", self.batch_size, "use 1-4096")
        check(
            self.device in ("auto", "cpu", "cuda"),
            "training.device",
            self.device,
            "use auto, cpu or cuda",
        )
        check(
            0 < self.validation_fraction < 1,
            "training.validation_fraction",
            self.validation_fraction,
            "use a fraction between 0 and 1",
        )
        try:
            self.dp()
        except ValueError as error:
            raise ConfigError(f"[training] {error}") from None

    def dp(self) -> DPSettings:
        """The DP-SGD settings."""
        return DPSettings(self.noise_multiplier, self.max_grad_norm, self.accountant)


@dataclass(frozen=True)
class AuditSettings:
    """The budget of the membership-inference audit this site runs on a candidate model,
    when its study requires one (`node.privacy.attacks`); the shadows copy the round's recipe."""

    shadow_models: int = 8
    shadow_epochs: int | None = None  # None: the round's local epochs
    bootstrap: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        try:
            self.budget()
        except ValueError as error:
            raise ConfigError(f"[privacy_audit] {error}") from None

    def budget(self) -> AuditConfig:
        """As the audit takes it."""
        return AuditConfig(
            shadow_models=self.shadow_models,
            shadow_epochs=self.shadow_epochs,
            bootstrap=self.bootstrap,
            seed=self.seed,
        )


# What the shipped Kubernetes configuration says until a site names its PACS.
ALLOW_LIST_PLACEHOLDER = "SET-THE-PACS-AE-TITLES"


@dataclass(frozen=True)
class ReceiverSettings:
    """The DICOM C-STORE receiver (`node.intake.receiver`), run by the node when enabled.
    Received objects are written to `<state_dir>/received` (the state volume is writable;
    the DICOM folder may be a read-only mount), ingested with the DICOM folder, and deleted
    once cached or quarantined and `retention_hours` old. Enabled, it needs an allow-list."""

    enabled: bool = False
    host: str = "127.0.0.1"  # loopback unless configured: a PACS on the LAN needs its address
    port: int = 11112
    ae_title: str = "TESSERA"
    allowed_calling_aets: str = ""  # comma-separated; required when enabled
    allowed_addresses: str = ""  # comma-separated addresses or CIDR blocks; empty: any
    tls_cert: Path | None = None  # DICOM TLS: the receiver's certificate (PEM) ...
    tls_key: Path | None = None  # ... and its key
    tls_client_ca: Path | None = None  # with TLS: every sender needs a certificate it signed
    max_object_mib: int = RECEIVER_MAX_OBJECT_BYTES >> 20
    quota_mib: int = RECEIVER_QUOTA_BYTES >> 20
    max_associations: int = RECEIVER_MAX_ASSOCIATIONS
    retention_hours: float = 0.0  # keep a cached original this long before deleting it

    def __post_init__(self) -> None:
        check(0 <= self.port < 65536, "receiver.port", self.port, "use a TCP port, 1-65535")
        check(
            1 <= len(self.ae_title) <= 16 and self.ae_title.isascii(),
            "receiver.ae_title",
            self.ae_title,
            "use 1-16 ASCII characters",
        )
        check(
            self.allowed_calling_aets.strip() != ALLOW_LIST_PLACEHOLDER,
            "receiver.allowed_calling_aets",
            self.allowed_calling_aets,
            "it is the shipped placeholder: set the calling AE titles of the PACS that may "
            'push, comma-separated (e.g. "PACS1,PACS2"), in node.toml or '
            "TESSERA_RECEIVER_ALLOWED_CALLING_AETS",
        )
        check(
            not self.enabled or bool(self.calling_aets),
            "receiver.allowed_calling_aets",
            self.allowed_calling_aets,
            "an enabled receiver accepts only the calling AE titles it lists: set the PACS's, "
            'comma-separated (e.g. "PACS1,PACS2")',
        )
        check(
            (self.tls_cert is None) == (self.tls_key is None),
            "receiver.tls_cert",
            self.tls_cert,
            "DICOM TLS needs both tls_cert and tls_key (or neither)",
        )
        check(
            self.tls_client_ca is None or self.tls_cert is not None,
            "receiver.tls_client_ca",
            self.tls_client_ca,
            "a client CA needs TLS: set tls_cert and tls_key too",
        )
        check(
            self.retention_hours >= 0,
            "receiver.retention_hours",
            self.retention_hours,
            "use 0 (delete once cached) or more",
        )
        if self.enabled:
            try:
                self.receiver_config(Path("/"))
            except ValueError as error:
                raise ConfigError(f"[receiver] {error}") from None

    @property
    def calling_aets(self) -> tuple[str, ...]:
        """The allowed calling AE titles."""
        return _split(self.allowed_calling_aets)

    def receiver_config(self, state_dir: Path, audit_log: Path | None = None) -> ReceiverConfig:
        """As `node.intake.receiver` takes it (imported here: pynetdicom only when used)."""
        from node.intake.receiver import ReceiverConfig, ReceiverTLS

        tls = None
        if self.tls_cert is not None and self.tls_key is not None:
            tls = ReceiverTLS(self.tls_cert, self.tls_key, self.tls_client_ca)
        return ReceiverConfig(
            state_dir=state_dir,
            allowed_calling_aets=self.calling_aets,
            host=self.host,
            port=self.port,
            ae_title=self.ae_title,
            allowed_networks=_split(self.allowed_addresses),
            tls=tls,
            max_object_bytes=self.max_object_mib << 20,
            quota_bytes=self.quota_mib << 20,
            max_associations=self.max_associations,
            audit_log=audit_log,
        )


def _split(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


@dataclass(frozen=True)
class NodeConfig:
    """Everything `tessera node run` needs, validated."""

    site_id: str
    bundle_dir: Path
    study_id: str
    state_dir: Path = Path("/var/lib/tessera")
    manifest: Path | None = None
    approvals_dir: Path | None = None
    policy: Path | None = None
    architecture: str | None = None
    dicom_dir: Path | None = None
    labels_csv: Path | None = None
    intake_workers: int = 2
    intake_interval_s: float = 300.0
    http_host: str = "0.0.0.0"  # noqa: S104 - probes and inference clients come from outside
    http_port: int = 8080
    # How far this node's clock may be from the leader's (measured from its signed
    # RoundOpen, node.round.clock) and still be corrected; beyond it rounds are refused
    # ("clock-skew") until the clock is synchronised.
    max_clock_skew_s: float = 900.0
    log_level: str = "INFO"
    broker: BrokerEndpointSettings = field(default_factory=BrokerEndpointSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    privacy_audit: AuditSettings = field(default_factory=AuditSettings)
    receiver: ReceiverSettings = field(default_factory=ReceiverSettings)

    def __post_init__(self) -> None:
        check(0 <= self.http_port < 65536, "http_port", self.http_port, "use 1-65535")
        check(1 <= self.intake_workers <= 64, "intake_workers", self.intake_workers, "use 1-64")
        check(self.intake_interval_s >= 1, "intake_interval_s", self.intake_interval_s, "use >= 1")
        check(
            0 <= self.max_clock_skew_s <= 86_400,
            "max_clock_skew_s",
            self.max_clock_skew_s,
            "use 0-86400 seconds (0: no skew tolerated; synchronise clocks with NTP)",
        )
        check(
            self.log_level in ("DEBUG", "INFO", "WARNING", "ERROR"),
            "log_level",
            self.log_level,
            "use DEBUG, INFO, WARNING or ERROR",
        )

    @property
    def manifest_path(self) -> Path:
        """The federation manifest (default: the bundle's)."""
        return self.manifest or self.bundle_dir / "manifest.toml"

    @property
    def approvals_path(self) -> Path:
        """The folder of this site's steward approvals (default: the bundle's)."""
        return self.approvals_dir or self.bundle_dir / "approvals"


_SECTIONS = {
    "broker": BrokerEndpointSettings,
    "training": TrainingSettings,
    "privacy_audit": AuditSettings,
    "receiver": ReceiverSettings,
}


def load_node_config(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> NodeConfig:
    """Read `path` (TOML), apply TESSERA_* overrides from `env` (default os.environ)."""
    return node_config_from_mapping(read_toml(path), os.environ if env is None else env, str(path))


def node_config_from_mapping(
    document: Mapping[str, Any], env: Mapping[str, str], origin: str = "the configuration"
) -> NodeConfig:
    """Build the config from a parsed TOML document plus environment overrides."""
    config: NodeConfig = build_document(NodeConfig, _SECTIONS, document, env, origin)
    return config
