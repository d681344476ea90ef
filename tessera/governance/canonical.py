"""Canonical JSON: the one byte encoding that governance signatures and hashes cover.

The federation manifest, study approvals and audit entries are signed or hashed over these
bytes, never over a file's formatting, so reformatting a TOML file changes nothing that is
signed. The encoding is JSON with:

- object keys sorted (by code point), no insignificant whitespace (`,` and `:` separators);
- ASCII only: every non-ASCII character is written as a `\\uXXXX` escape;
- integers in decimal; floats as Python's shortest round-trip form (`repr`), so `8.0` stays
  `8.0` and `1e-05` stays `1e-05`; NaN and the infinities are refused;
- only str, int, float, bool, None, lists and str-keyed dicts; anything else (bytes, dates)
  must be turned into a string by the caller first, which the callers document.

The same value always gives the same bytes, in every Python process, on every platform.
"""

from __future__ import annotations

import json
from typing import Any


def canonical_json(value: Any) -> bytes:
    """Encode `value` canonically (see the module docstring); ValueError for NaN or inf."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")
