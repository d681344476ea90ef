"""Identifiers: the one rule every federation, study, site and aggregator id follows.

Ids appear in MQTT topics, seal bindings and signed headers, so they are short, ASCII and
topic-safe: 1 to 64 characters of `A-Z a-z 0-9 . _ -`, starting with a letter or digit. They
name organisations and studies, never patients.
"""

from __future__ import annotations

import re

from tessera.errors import CodecError

MAX_ID_LENGTH = 64
_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_id(name: str, value: object) -> str:
    """Return `value` if it is a valid id, else raise CodecError naming `name` and the rule."""
    if not isinstance(value, str) or _ID_PATTERN.fullmatch(value) is None:
        raise CodecError(
            f"{name} {value!r} is not a valid id: use 1 to {MAX_ID_LENGTH} characters of "
            "A-Z a-z 0-9 . _ -, starting with a letter or digit"
        )
    return value
