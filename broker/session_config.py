"""Session configuration: endpoints, TLS files, proxy and limits, validated up front."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tessera.errors import ConfigError
from tessera.limits import DEFAULT_MQTT_PACKET_BYTES


@dataclass(frozen=True)
class TlsFiles:
    """The federation CA and this client's certificate and private key (PEM)."""

    ca_file: Path
    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class HttpProxy:
    """An HTTP proxy that allows CONNECT to the broker (hospital egress)."""

    host: str
    port: int


@dataclass(frozen=True)
class SessionConfig:
    """Everything a Session needs; validated on construction."""

    client_id: str
    host: str
    port: int
    tls: TlsFiles | None
    transport: Literal["tcp", "websockets"] = "tcp"
    websocket_path: str = "/mqtt"
    proxy: HttpProxy | None = None
    presence_topic: str | None = None
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 24 * 3600
    max_inflight: int = 20
    max_queued: int = 1000
    receive_maximum: int = 64
    max_packet_bytes: int = DEFAULT_MQTT_PACKET_BYTES
    reconnect_min_s: float = 0.25
    reconnect_max_s: float = 30.0
    connect_timeout_s: float = 10.0
    # How long a publish waits for the broker's PUBACK before it is reported stalled.
    publish_timeout_s: float = 300.0
    # How often a message whose handler deferred it (broker.errors.DeliveryDeferred) is
    # offered to the handler again while it stays unacknowledged.
    deferred_retry_s: float = 5.0
    insecure_plaintext: bool = False
    protocol: Literal["mqttv5", "mqttv311"] = "mqttv5"

    def __post_init__(self) -> None:
        if self.tls is None and not self.insecure_plaintext:
            raise ConfigError(
                "SessionConfig.tls is missing: production sessions need the CA, client "
                "certificate and key; set insecure_plaintext=True only for the dev broker"
            )
        if self.protocol not in ("mqttv5", "mqttv311"):
            raise ConfigError(f"protocol {self.protocol!r} must be 'mqttv5' or 'mqttv311'")
        if self.protocol == "mqttv311" and not self.insecure_plaintext:
            raise ConfigError(
                "MQTT 3.1.1 lacks the reason codes and flow control the services rely on; it is "
                "allowed only with insecure_plaintext, for the development broker"
            )
        if self.transport not in ("tcp", "websockets"):
            raise ConfigError(f"transport {self.transport!r} must be 'tcp' or 'websockets'")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port {self.port} must be 1-65535")
        checks = {
            "keepalive_s": (5, 65535),
            "session_expiry_s": (0, 0xFFFFFFFF),
            "max_inflight": (1, 65535),
            "max_queued": (1, 1 << 20),
            "receive_maximum": (1, 65535),
            "max_packet_bytes": (1024, 268435455),
        }
        for name, (low, high) in checks.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise ConfigError(f"SessionConfig.{name} = {value} must be in [{low}, {high}]")
        if not 0 < self.publish_timeout_s < float("inf"):
            raise ConfigError(
                f"SessionConfig.publish_timeout_s = {self.publish_timeout_s} must be a number > 0"
            )
        if not 0 < self.deferred_retry_s <= 3600:
            raise ConfigError(
                f"SessionConfig.deferred_retry_s = {self.deferred_retry_s} must be in (0, 3600]"
            )
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ConfigError("reconnect_min_s must be positive and at most reconnect_max_s")


def tls_context(files: TlsFiles) -> ssl.SSLContext:
    """A client TLS context: federation CA only, host name checked, TLS 1.2 or later."""
    for path in (files.ca_file, files.cert_file, files.key_file):
        if not Path(path).is_file():
            raise ConfigError(f"TLS file {path} does not exist; point the config at the bundle")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(files.ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(files.cert_file), str(files.key_file))
    return context
