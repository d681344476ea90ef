"""Settings files: TOML tables plus `TESSERA_*` environment overrides into frozen dataclasses.

One loader for every service's configuration (aggregator, node): each dataclass validates
itself in `__post_init__`; this module maps TOML values and environment strings onto its
fields by their type hints (bool, int, float, str, Path, and optional ones), and turns every
mistake into one error that names the key, where it came from and the fix.
"""

from __future__ import annotations

import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from tessera.errors import ConfigError

ENV_PREFIX = "TESSERA_"


def read_toml(
    path: str | os.PathLike[str], error: type[ConfigError] = ConfigError
) -> dict[str, Any]:
    """The parsed TOML document at `path`; `error` saying what is wrong otherwise."""
    source = Path(path)
    try:
        return tomllib.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(
            f"configuration file {source} does not exist; pass --config with the right path"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"configuration file {source} is not valid TOML: {exc}") from None


def check(
    ok: bool, key: str, value: object, fix: str, error: type[ConfigError] = ConfigError
) -> None:
    """Raise `error` naming the key, its value and the fix unless `ok`."""
    if not ok:
        raise error(f"{key} = {value!r} is invalid; {fix}")


def build_settings(
    cls: type,
    table: Mapping[str, Any],
    env: Mapping[str, str],
    prefix: str,
    origin: str,
    given: Mapping[str, Any] | None = None,
    *,
    error: type[ConfigError] = ConfigError,
    env_prefix: str = ENV_PREFIX,
) -> Any:
    """An instance of the dataclass `cls` from a TOML table, `env` overrides and `given`.

    A key `k` of a section `s` is overridden by `TESSERA_S_K`; unknown keys, missing
    required keys and values of the wrong type raise `error` naming the key and the fix;
    the dataclass's own validation errors are re-raised as `error` too.
    """
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise error(
            f"unknown key {prefix}{unknown[0]} in {origin}; known keys here: "
            f"{', '.join(sorted(known - set(given or {})))} (check the spelling)"
        )
    values: dict[str, Any] = dict(given or {})
    for item in fields(cls):
        if item.name in values:
            continue
        key = f"{prefix}{item.name}"
        env_name = env_prefix + key.replace(".", "_").upper()
        if env_name in env:
            values[item.name] = _coerce(
                env[env_name], hints[item.name], key, env_name, error, env_prefix
            )
        elif item.name in table:
            values[item.name] = _coerce(
                table[item.name], hints[item.name], key, origin, error, env_prefix
            )
        elif item.default is MISSING and item.default_factory is MISSING:
            raise error(f"required key {key} is missing; add it to {origin} or set {env_name}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise error(f"{origin}: {exc}") from None


def _coerce(
    raw: Any, kind: Any, key: str, where: str, error: type[ConfigError], env_prefix: str
) -> Any:
    """Convert a TOML value, or an environment string, to the field's type."""
    options = typing.get_args(kind) or (kind,)
    if type(None) in options and raw == "":
        return None  # an empty override clears an optional path
    target = next(t for t in options if t is not type(None))
    value = _convert(raw, target, from_env=where.startswith(env_prefix), error=error)
    if value is None:
        name = getattr(target, "__name__", str(target))
        raise error(f"{key} = {raw!r} (from {where}) is not a valid {name}; fix it there")
    return value


def _convert(raw: Any, target: type, from_env: bool, error: type[ConfigError]) -> Any:
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
    raise error(f"configuration type {target} is not supported")  # a bug


def build_document(
    cls: type,
    sections: Mapping[str, type],
    document: Mapping[str, Any],
    env: Mapping[str, str],
    origin: str,
    *,
    error: type[ConfigError] = ConfigError,
) -> Any:
    """`cls` from a whole TOML document: each key of `sections` is a table built into its
    own dataclass (overrides `TESSERA_<SECTION>_<KEY>`), the rest are `cls`'s own keys."""
    top = {k: v for k, v in document.items() if k not in sections}
    built: dict[str, Any] = {}
    for name, section in sections.items():
        table = document.get(name, {})
        if not isinstance(table, Mapping):
            raise error(f"[{name}] in {origin} must be a table, got {table!r}")
        built[name] = build_settings(section, table, env, f"{name}.", origin, error=error)
    return build_settings(cls, top, env, "", origin, built, error=error)
