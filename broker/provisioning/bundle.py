"""A member's startup bundle: what provisioning hands one site or aggregator.

Layout of ``bundles/<member-id>/`` (folder 0700, private keys 0600)::

    bundle.toml      member id, role, federation, broker endpoints, coordinator public key
    ca.pem           federation CA (trust anchor for the broker's certificate)
    client.pem       this member's TLS client certificate (CN = member id)
    client.key       its private key                                   0600
    signing.key      Ed25519 end-to-end signing key (tessera.crypto.signing)  0600
    hpke.key         X25519 HPKE key, aggregators only (tessera.crypto.sealing) 0600
    roster.json      every member's public keys, canonical JSON
    roster.sig       the coordinator's Ed25519 signature over roster.json
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from broker.provisioning.roster import Roster, load_roster
from broker.session import HttpProxy, SessionConfig, TlsFiles
from broker.topics import presence_topic
from tessera.crypto.sealing import load_hpke_key
from tessera.crypto.signing import load_private_key, load_public_key
from tessera.errors import ConfigError
from tessera.limits import MQTT_PACKET_OVERHEAD_BYTES

BUNDLE_FORMAT = 1


@dataclass(frozen=True)
class Bundle:
    """A loaded, verified startup bundle."""

    path: Path
    member_id: str
    role: str
    federation_id: str
    hostnames: tuple[str, ...]
    mqtt_port: int
    websockets_port: int | None  # None: the broker has no WebSockets listener
    max_packet_bytes: int
    coordinator_key: Ed25519PublicKey
    roster: Roster

    @property
    def tls_files(self) -> TlsFiles:
        """CA, client certificate and key for the MQTT session."""
        return TlsFiles(self.path / "ca.pem", self.path / "client.pem", self.path / "client.key")

    def signing_key(self) -> Ed25519PrivateKey:
        """This member's Ed25519 signing key."""
        return load_private_key(self.path / "signing.key")

    def hpke_key(self) -> X25519PrivateKey:
        """This aggregator's HPKE private key; ConfigError for a site."""
        if self.role != "aggregator":
            raise ConfigError(f"{self.member_id} is a {self.role}; only aggregators hold HPKE keys")
        return load_hpke_key(self.path / "hpke.key")

    def session_config(
        self,
        host: str | None = None,
        *,
        port: int | None = None,
        transport: Literal["tcp", "websockets"] = "tcp",
        proxy: HttpProxy | None = None,
        **overrides: Any,
    ) -> SessionConfig:
        """A SessionConfig for this member: its certificate, presence topic, broker endpoint."""
        if host is None:
            if not self.hostnames:
                raise ConfigError(f"bundle {self.path} names no broker host; pass host=")
            host = self.hostnames[0]
        chosen = port or (self.mqtt_port if transport == "tcp" else self.websockets_port)
        if chosen is None:
            raise ConfigError(
                f"the federation's broker has no WebSockets listener (bundle {self.path}); the "
                "coordinator enables one with [broker] websockets_port in FEDERATION.toml"
            )
        return SessionConfig(
            client_id=self.member_id,
            host=host,
            port=chosen,
            tls=self.tls_files,
            transport=transport,
            proxy=proxy,
            presence_topic=presence_topic(self.federation_id, self.member_id),
            max_packet_bytes=overrides.pop(
                "max_packet_bytes", self.max_packet_bytes + MQTT_PACKET_OVERHEAD_BYTES
            ),
            **overrides,
        )


def bundle_document(
    member_id: str, role: str, federation_id: str, broker: dict[str, Any], coordinator: bytes
) -> dict[str, Any]:
    """The bundle.toml table that provisioning writes."""
    return {
        "format": BUNDLE_FORMAT,
        "member": {"id": member_id, "role": role, "federation": federation_id},
        "broker": broker,
        "coordinator": {"public_key": coordinator.hex()},
    }


def load_bundle(path: Path) -> Bundle:
    """Load ``bundle.toml`` and verify the roster with the bundle's coordinator key."""
    folder = Path(path)
    try:
        doc = tomllib.loads((folder / "bundle.toml").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{folder} holds no bundle.toml; point at a provisioned bundle") from None
    try:
        if doc["format"] != BUNDLE_FORMAT:
            raise ConfigError(f"bundle format {doc['format']!r} is not {BUNDLE_FORMAT}")
        member, broker = doc["member"], doc["broker"]
        coordinator = load_public_key(bytes.fromhex(doc["coordinator"]["public_key"]))
        roster = load_roster(folder / "roster.json", folder / "roster.sig", coordinator)
        bundle = Bundle(
            folder,
            member["id"],
            member["role"],
            member["federation"],
            tuple(broker["hostnames"]),
            int(broker["mqtt_port"]),
            int(broker["websockets_port"]) if "websockets_port" in broker else None,
            int(broker["max_packet_bytes"]),
            coordinator,
            roster,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"bundle {folder}/bundle.toml is malformed: {error}") from None
    roster.member(bundle.member_id)
    if roster.federation_id != bundle.federation_id:
        raise ConfigError(f"bundle {folder}: roster is for another federation")
    return bundle
