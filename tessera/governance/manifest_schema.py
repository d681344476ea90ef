"""Strict reading of a manifest's parsed TOML into the manifest's frozen dataclasses.

Every error is a ConfigError that names the key (`studies[chest-xray].dp.epsilon`), the
value that was wrong, and the fix. Unknown keys are refused, so a misspelt term (`max_round`)
can never be silently ignored. See `tessera.governance.manifest` for the format.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import math
import re
from collections.abc import Mapping
from typing import Any

from tessera.errors import CodecError, ConfigError
from tessera.governance.manifest_model import (
    FORMAT,
    Aggregator,
    DPRequirement,
    Manifest,
    Member,
    PreprocessingValue,
    PrivacyAuditRequirement,
    Site,
    Study,
)
from tessera.wire.ids import check_id

KEY_LENGTH = 32
SIGNATURE_LENGTH = 64
_TOP_KEYS = (
    "format",
    "federation",
    "coordinator",
    "auditors",
    "sites",
    "aggregators",
    "studies",
    "signature",
)


class _Table:
    """One TOML table being read: typed getters that name the key path, and a check that no
    key was left unread."""

    def __init__(self, data: object, path: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"manifest {path}: expected a table, got {type(data).__name__}")
        self.data: Mapping[str, Any] = data
        self.path = path
        self.used: set[str] = set()

    def _where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def raw(self, key: str, example: str) -> Any:
        self.used.add(key)
        if key not in self.data:
            raise ConfigError(f"manifest {self._where(key)} is missing; add e.g. {example}")
        return self.data[key]

    def string(self, key: str, example: str) -> str:
        value = self.raw(key, example)
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(
                f"manifest {self._where(key)}: expected a non-empty string, got {value!r}; "
                f"write e.g. {example}"
            )
        return value

    def ident(self, key: str, example: str) -> str:
        value = self.string(key, example)
        try:
            return check_id(f"manifest {self._where(key)}:", value)
        except CodecError as error:
            raise ConfigError(str(error)) from None

    def integer(self, key: str, minimum: int, example: str) -> int:
        value = self.raw(key, example)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(
                f"manifest {self._where(key)}: expected an integer >= {minimum}, got {value!r}; "
                f"write e.g. {example}"
            )
        return value

    def positive_float(self, key: str, example: str, maximum: float = math.inf) -> float:
        value = self.raw(key, example)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or not 0 < value < maximum:
            bound = f" and below {maximum}" if math.isfinite(maximum) else ""
            raise ConfigError(
                f"manifest {self._where(key)}: expected a finite number above 0{bound}, "
                f"got {value!r}; write e.g. {example}"
            )
        return float(value)

    def strings(self, key: str, example: str) -> tuple[str, ...]:
        value = self.raw(key, example)
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(item, str) and item.strip() for item in value)
        ):
            raise ConfigError(
                f"manifest {self._where(key)}: expected a non-empty list of strings, "
                f"got {value!r}; write e.g. {example}"
            )
        if len(set(value)) != len(value):
            raise ConfigError(f"manifest {self._where(key)}: {value!r} lists an entry twice")
        return tuple(value)

    def key_bytes(self, key: str) -> bytes:
        text = self.string(key, f'{key} = "<base64 of 32 raw bytes>"')
        return decode_key(text, f"manifest {self._where(key)}")

    def tables(self, key: str, minimum: int) -> list[_Table]:
        self.used.add(key)
        value = self.data.get(key, [])
        if not isinstance(value, list) or len(value) < minimum:
            count = len(value) if isinstance(value, list) else type(value).__name__
            raise ConfigError(
                f"manifest {self._where(key)}: expected at least {minimum} entries "
                f"([[{self._where(key)}]] tables), got {count}"
            )
        return [_Table(item, f"{self._where(key)}[{index}]") for index, item in enumerate(value)]

    def finish(self, allowed: tuple[str, ...] | None = None) -> None:
        extra = sorted(set(self.data) - (set(allowed) if allowed else self.used))
        if extra:
            known = ", ".join(sorted(allowed if allowed else self.used))
            raise ConfigError(
                f"manifest {self.path or 'top level'}: unknown key {extra[0]!r}; remove it or "
                f"fix its spelling (known keys: {known})"
            )


def decode_key(text: str, where: str) -> bytes:
    """A raw 32-byte public key from 64 hex digits or standard base64; ConfigError naming
    `where` (the key's place, e.g. "manifest sites[0].node_key") if neither."""
    raw: bytes | None = None
    if len(text) == 2 * KEY_LENGTH and re.fullmatch(r"[0-9a-fA-F]+", text):
        raw = bytes.fromhex(text)
    else:
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raw = None
    if raw is None or len(raw) != KEY_LENGTH:
        raise ConfigError(
            f"{where}: {text!r} is not a raw {KEY_LENGTH}-byte public key; write it "
            "as standard base64 (44 characters) or 64 hex digits"
        )
    return raw


def _member(table: _Table) -> Member:
    member = Member(id=table.ident("id", 'id = "alice"'), key=table.key_bytes("key"))
    table.finish(("id", "key"))
    return member


def _unique_ids(items: list[Any], path: str) -> None:
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise ConfigError(f"manifest {path}: id {item.id!r} appears twice; ids must be unique")
        seen.add(item.id)


def _members(table: _Table, key: str, minimum: int) -> tuple[Member, ...]:
    members = [_member(item) for item in table.tables(key, minimum)]
    _unique_ids(members, f"{table.path}.{key}")
    return tuple(members)


def _preprocessing(value: object, path: str) -> tuple[tuple[str, PreprocessingValue], ...]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"manifest {path}: expected a table such as {{ size = 224 }}")
    items: list[tuple[str, PreprocessingValue]] = []
    for name, item in value.items():
        scalar = (str, int, float, bool)
        ok = isinstance(item, scalar) or (
            isinstance(item, list) and all(isinstance(x, scalar) for x in item)
        )
        if not ok or (isinstance(item, float) and not math.isfinite(item)):
            raise ConfigError(
                f"manifest {path}.{name}: {item!r} is not a finite number, string, boolean or "
                "list of those; nested tables are not allowed in preprocessing"
            )
        items.append((name, tuple(item) if isinstance(item, list) else item))
    return tuple(sorted(items))


def _study(table: _Table) -> Study:
    dp = _Table(table.raw("dp", "dp = { epsilon = 8.0, delta = 1e-5 }"), f"{table.path}.dp")
    requirement = DPRequirement(
        epsilon=dp.positive_float("epsilon", "epsilon = 8.0"),
        delta=dp.positive_float("delta", "delta = 1e-5", maximum=1.0),
    )
    dp.finish(("epsilon", "delta"))
    expires = table.raw("expires", "expires = 2027-06-30")
    if not isinstance(expires, dt.date) or isinstance(expires, dt.datetime):
        raise ConfigError(
            f"manifest {table.path}.expires: expected a TOML date such as 2027-06-30 "
            f"(no quotes, no time of day), got {expires!r}"
        )
    study = Study(
        id=table.ident("id", 'id = "chest-xray"'),
        purpose=table.string("purpose", 'purpose = "pneumonia triage on chest X-rays"'),
        labels=table.strings("labels", 'labels = ["normal", "pneumonia"]'),
        architectures=tuple(sorted(table.strings("architectures", 'architectures = ["cnn"]'))),
        preprocessing=_preprocessing(
            table.raw("preprocessing", "preprocessing = { size = 64 }"),
            f"{table.path}.preprocessing",
        ),
        min_participants=table.integer("min_participants", 2, "min_participants = 3"),
        max_rounds=table.integer("max_rounds", 1, "max_rounds = 50"),
        dp=requirement,
        clip_norm=table.positive_float("clip_norm", "clip_norm = 1.0"),
        expires=expires,
        privacy_audit=_privacy_audit(table),
    )
    table.finish()
    return study


def _privacy_audit(table: _Table) -> PrivacyAuditRequirement | None:
    """The optional `privacy_audit = { max_tpr_at_0_1pct_fpr = 0.05 }` term."""
    if "privacy_audit" not in table.data:
        return None
    example = "privacy_audit = { max_tpr_at_0_1pct_fpr = 0.05 }"
    audit = _Table(table.raw("privacy_audit", example), f"{table.path}.privacy_audit")
    limit = audit.positive_float("max_tpr_at_0_1pct_fpr", example, maximum=1.0)
    audit.finish(("max_tpr_at_0_1pct_fpr",))
    return PrivacyAuditRequirement(limit)


def manifest_from_dict(data: Mapping[str, Any]) -> Manifest:
    """Validate parsed TOML and build the Manifest; ConfigError on any flaw."""
    top = _Table(data, "")
    top.finish(_TOP_KEYS)
    declared = data.get("format", FORMAT)
    if declared != FORMAT:
        raise ConfigError(
            f"manifest format: {declared!r} is not supported; this Tessera reads {FORMAT!r}"
        )
    federation = _Table(top.raw("federation", "[federation] id/version"), "federation")
    federation_id = federation.ident("id", 'id = "demo-federation"')
    version = federation.integer("version", 1, "version = 1")
    federation.finish(("id", "version"))
    coordinator = _member(_Table(top.raw("coordinator", "[coordinator] id/key"), "coordinator"))
    auditors = tuple(_member(t) for t in top.tables("auditors", 0))
    sites = []
    for table in top.tables("sites", 1):
        sites.append(
            Site(
                id=table.ident("id", 'id = "site-a"'),
                node_key=table.key_bytes("node_key"),
                administrators=_members(table, "administrators", 0),
                stewards=_members(table, "stewards", 1),
            )
        )
        table.finish(("id", "node_key", "administrators", "stewards"))
    aggregators = []
    for table in top.tables("aggregators", 2):
        aggregators.append(
            Aggregator(
                id=table.ident("id", 'id = "agg-1"'),
                signing_key=table.key_bytes("signing_key"),
                hpke_key=table.key_bytes("hpke_key"),
                operators=_members(table, "operators", 0),
            )
        )
        table.finish(("id", "signing_key", "hpke_key", "operators"))
    studies = [_study(table) for table in top.tables("studies", 1)]
    for items, path in ((auditors, "auditors"), (sites, "sites"), (aggregators, "aggregators")):
        _unique_ids(list(items), path)
    _unique_ids(studies, "studies")
    if len({s.id for s in sites} | {a.id for a in aggregators}) != len(sites) + len(aggregators):
        raise ConfigError("manifest: a site and an aggregator share an id; give each its own")
    for study in studies:
        if study.min_participants > len(sites):
            raise ConfigError(
                f"manifest studies[{study.id}].min_participants: {study.min_participants} is "
                f"more than the {len(sites)} sites, so no round could ever run; lower it or "
                "add sites"
            )
    manifest = Manifest(
        federation_id=federation_id,
        version=version,
        coordinator=coordinator,
        auditors=tuple(sorted(auditors, key=lambda m: m.id)),
        sites=tuple(sorted(sites, key=lambda s: s.id)),
        aggregators=tuple(sorted(aggregators, key=lambda a: a.id)),
        studies=tuple(sorted(studies, key=lambda s: s.id)),
        signature=_signature(data.get("signature")),
    )
    _distinct_keys(manifest)
    return manifest


def _signature(value: object) -> bytes | None:
    if value is None:
        return None
    table = _Table(value, "signature")
    text = table.string("value", 'value = "<base64 signature>"')
    table.finish(("value",))
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != SIGNATURE_LENGTH:
        raise ConfigError(
            "manifest signature.value is not a base64 Ed25519 signature; remove the "
            "[signature] table and sign again with `tessera manifest sign`"
        )
    return raw


def _distinct_keys(manifest: Manifest) -> None:
    """Refuse one key held by two principals: each role must be separately accountable."""
    owners: dict[bytes, str] = {}
    for name, key in manifest.principal_keys():
        if key in owners:
            raise ConfigError(
                f"manifest: {name} and {owners[key]} have the same public key; give each "
                "principal its own key pair"
            )
        owners[key] = name
