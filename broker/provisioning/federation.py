"""FEDERATION.toml: who is in a federation, as the coordinator writes it for provisioning.

    [federation]
    id = "eu-chest-xray"            # opaque id, used in topics
    leader = "agg-uni"              # the aggregator that opens rounds and agrees the set
    studies = ["chest-xray"]        # the study ids the broker carries: its ACL names each

    [broker]
    hostnames = ["broker.example.org"]   # certificate names besides localhost / 127.0.0.1
    mqtt_port = 8883                     # MQTT over TLS
    # websockets_port = 443              # MQTT over secure WebSockets: off unless set, since
    #                                    # Mosquitto 2.0 checks no CRL there (see below)
    max_packet_bytes = 2097152           # largest MQTT packet the broker accepts

    [[sites]]
    id = "site-a"                   # opaque id: certificate CN and MQTT username
    name = "St. Example Hospital"   # organisation name in its certificate (<= 64 chars)

    [[aggregators]]
    id = "agg-uni"
    name = "University Research Computing"

Ids are 1-64 of [A-Za-z0-9_-]; every id is unique across sites and aggregators. A study
id is listed before the manifest that defines the study is signed: the ACL grants study
topics for the listed ids only, so a member cannot store messages under a made-up study.
Adding a study is an edit here and a `tessera provision --reuse-ca` (then reload the broker).

The WebSockets listener is opt-in: Mosquitto 2.0 serves it through libwebsockets, which
does not apply the listener's `crlfile` (eclipse/mosquitto#3042), so a revoked certificate
still connects there until it expires. Enable it only where a hospital can reach the broker
no other way.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from broker.errors import TopicError
from broker.topics import validate_id, validate_study
from tessera.errors import ConfigError
from tessera.limits import (
    DEFAULT_MQTT_PACKET_BYTES,
    MAX_MQTT_PACKET_BYTES,
    MIN_MQTT_PACKET_BYTES,
)

MAX_NAME_LENGTH = 64  # RFC 5280 upper bound of commonName and organizationName
Role = Literal["site", "aggregator"]


@dataclass(frozen=True)
class Member:
    """One site or aggregator."""

    id: str
    name: str
    role: Role


@dataclass(frozen=True)
class BrokerSettings:
    """Where members reach the broker and how large a packet it takes."""

    hostnames: tuple[str, ...] = ()
    mqtt_port: int = 8883
    websockets_port: int | None = None  # no WebSockets listener unless FEDERATION.toml sets one
    max_packet_bytes: int = DEFAULT_MQTT_PACKET_BYTES


@dataclass(frozen=True)
class Federation:
    """A validated FEDERATION.toml."""

    id: str
    leader: str
    broker: BrokerSettings
    sites: tuple[Member, ...]
    aggregators: tuple[Member, ...]
    studies: tuple[str, ...] = ()  # the study ids the broker's ACL grants topics for

    @property
    def members(self) -> tuple[Member, ...]:
        """Sites then aggregators."""
        return self.sites + self.aggregators

    def member(self, member_id: str) -> Member:
        """The member with this id; ConfigError if there is none."""
        for member in self.members:
            if member.id == member_id:
                return member
        raise ConfigError(f"no site or aggregator {member_id!r} in federation {self.id!r}")


def load_federation(path: Path) -> Federation:
    """Read and validate FEDERATION.toml; ConfigError names the bad field and the fix."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"federation file {path} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"federation file {path} is not valid TOML: {error}") from None
    return parse_federation(data, str(path))


def parse_federation(data: dict[str, Any], source: str = "FEDERATION.toml") -> Federation:
    """Validate the parsed TOML table."""
    unknown = set(data) - {"federation", "broker", "sites", "aggregators"}
    if unknown:
        raise ConfigError(f"{source}: unknown table(s) {sorted(unknown)}")
    head = _table(data, "federation", source)
    federation_id = _id(head.get("id"), f"{source}: [federation] id")
    sites = tuple(_member(m, "site", source) for m in _list(data, "sites", source))
    aggregators = tuple(
        _member(m, "aggregator", source) for m in _list(data, "aggregators", source)
    )
    if not sites:
        raise ConfigError(f"{source}: add at least one [[sites]] entry")
    if len(aggregators) < 2:
        raise ConfigError(
            f"{source}: {len(aggregators)} aggregator(s); secret sharing needs at least two "
            "[[aggregators]] run by organisations that do not collude"
        )
    ids = [m.id for m in sites + aggregators]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ConfigError(
            f"{source}: ids must be unique across sites and aggregators: {duplicates}"
        )
    leader = _id(head.get("leader"), f"{source}: [federation] leader")
    if leader not in {a.id for a in aggregators}:
        raise ConfigError(f"{source}: leader {leader!r} is not one of the [[aggregators]] ids")
    studies = _studies(head.get("studies"), source)
    return Federation(
        federation_id, leader, _broker(data.get("broker", {}), source), sites, aggregators, studies
    )


def _studies(value: Any, source: str) -> tuple[str, ...]:
    where = f"{source}: [federation] studies"
    if not isinstance(value, list) or not value:
        raise ConfigError(
            f"{where} must list the study ids the broker carries, e.g. studies = "
            '["chest-xray"]: its ACL grants study topics for these ids only'
        )
    studies = []
    for study in value:
        try:
            studies.append(validate_study(study))
        except TopicError as error:
            raise ConfigError(f"{where}: {error}") from None
    if len(set(studies)) != len(studies):
        raise ConfigError(f"{where} lists a study id twice: {studies}")
    return tuple(studies)


def _broker(table: Any, source: str) -> BrokerSettings:
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [broker] must be a table")
    hostnames = table.get("hostnames", [])
    if not isinstance(hostnames, list) or not all(isinstance(h, str) and h for h in hostnames):
        raise ConfigError(f"{source}: [broker] hostnames must be a list of host names")
    settings = BrokerSettings(
        tuple(hostnames),
        table.get("mqtt_port", 8883),
        table.get("websockets_port"),
        table.get("max_packet_bytes", DEFAULT_MQTT_PACKET_BYTES),
    )
    for name in ("mqtt_port", "websockets_port"):
        value = getattr(settings, name)
        if name == "websockets_port" and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
            raise ConfigError(f"{source}: [broker] {name} = {value!r} must be 1-65535")
    if not isinstance(settings.max_packet_bytes, int) or not (
        MIN_MQTT_PACKET_BYTES <= settings.max_packet_bytes <= MAX_MQTT_PACKET_BYTES
    ):
        raise ConfigError(f"{source}: [broker] max_packet_bytes must be 64 KiB to 256 MiB")
    return settings


def _member(entry: Any, role: Role, source: str) -> Member:
    where = f"{source}: [[{role}s]]"
    if not isinstance(entry, dict) or set(entry) - {"id", "name"}:
        raise ConfigError(f"{where} entries take exactly 'id' and 'name', got {entry!r}")
    member_id = _id(entry.get("id"), f"{where} id")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where} {member_id!r}: give a non-empty name")
    if len(name) > MAX_NAME_LENGTH:
        raise ConfigError(
            f"{where} {member_id!r}: name {name!r} is {len(name)} characters, but a certificate "
            f"name field holds at most {MAX_NAME_LENGTH} (RFC 5280); shorten it, e.g. "
            f"{name[:MAX_NAME_LENGTH].rstrip()!r}"
        )
    return Member(member_id, name, role)


def _id(value: Any, where: str) -> str:
    try:
        return validate_id(value, where)
    except TopicError as error:
        raise ConfigError(str(error)) from None


def _table(data: dict[str, Any], key: str, source: str) -> dict[str, Any]:
    table = data.get(key)
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: missing [{key}] table")
    return table


def _list(data: dict[str, Any], key: str, source: str) -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise ConfigError(f"{source}: {key} must be an array of tables ([[{key}]])")
    return value
