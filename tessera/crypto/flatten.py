"""Canonical flattening of a model's parameters into one float32 vector, and back.

Node and aggregators must agree bit for bit on which vector coordinate is which weight,
across processes, machines and framework versions. So the order is defined by the data,
not by how a framework happens to iterate its modules: parameters are sorted by name
(Python string order, i.e. by Unicode code point). Names are unique keys, so the order is
total, and it does not depend on dict insertion order or module registration order, which
can differ between two builds of the same architecture. Each parameter is laid out in C
(row-major) order.

The `FlatManifest` lists name, shape and dtype per parameter; its `digest` names the layout,
so a vector can be checked against the model it belongs to before it is restored or summed.

Only dtypes that float32 represents exactly are accepted (float16, float32, and integers
of at most 16 bits), so that `unflatten(flatten(p))` restores `p` exactly. float64 and wide
integers would be rounded silently, so they are refused with the fix named.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

FLAT_DTYPE = np.dtype(np.float32)
# Every value of these dtypes is exactly representable in float32.
EXACT_DTYPES = frozenset({"float16", "float32", "int8", "uint8", "int16", "uint16"})
_DIGEST_DOMAIN = b"tessera/flat-manifest/v1"


@dataclass(frozen=True)
class ParamSpec:
    """One parameter's name, shape and dtype name (as numpy spells it, e.g. 'float32')."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a parameter name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.shape, tuple) or not all(
            isinstance(d, int) and d >= 0 for d in self.shape
        ):
            raise ValueError(
                f"parameter {self.name!r}: shape must be a tuple of ints >= 0, got {self.shape!r}"
            )
        if self.dtype not in EXACT_DTYPES:
            raise ValueError(
                f"parameter {self.name!r} has dtype {self.dtype}, which float32 cannot hold "
                f"exactly; cast it to float32 first (allowed: {', '.join(sorted(EXACT_DTYPES))})"
            )

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class FlatManifest:
    """The layout of a flat vector: parameter specs in canonical (name-sorted) order."""

    specs: tuple[ParamSpec, ...]

    def __post_init__(self) -> None:
        names = [spec.name for spec in self.specs]
        if names != sorted(names) or len(set(names)) != len(names):
            raise ValueError(
                "manifest specs must be unique and sorted by name (the canonical order); "
                "build the manifest with flatten()"
            )

    @property
    def size(self) -> int:
        """Length of the flat vector."""
        return sum(spec.size for spec in self.specs)

    def digest(self) -> bytes:
        """SHA-256 of a canonical, injective encoding of the layout (names, dtypes, shapes).

        Equal digests mean equal layouts; any change to a name, dtype, shape or the set of
        parameters changes it.
        """
        hasher = hashlib.sha256()
        hasher.update(struct.pack(">I", len(_DIGEST_DOMAIN)) + _DIGEST_DOMAIN)
        hasher.update(struct.pack(">I", len(self.specs)))
        for spec in self.specs:
            name = spec.name.encode()
            dtype = spec.dtype.encode()
            hasher.update(struct.pack(">I", len(name)) + name)
            hasher.update(struct.pack(">I", len(dtype)) + dtype)
            hasher.update(struct.pack(">I", len(spec.shape)))
            hasher.update(b"".join(struct.pack(">Q", d) for d in spec.shape))
        return hasher.digest()


def flatten(params: Mapping[str, np.ndarray]) -> tuple[np.ndarray, FlatManifest]:
    """Concatenate the parameters, sorted by name, into one new float32 vector.

    Returns the vector and its manifest. Raises ValueError for a dtype that float32 cannot
    hold exactly, naming the parameter.
    """
    arrays = {name: np.asarray(value) for name, value in params.items()}
    specs = tuple(
        ParamSpec(name, tuple(int(d) for d in arrays[name].shape), arrays[name].dtype.name)
        for name in sorted(arrays)
    )
    manifest = FlatManifest(specs)
    vector = np.empty(manifest.size, dtype=FLAT_DTYPE)
    offset = 0
    for spec in specs:
        # Assigning a C-order ravel casts exactly (checked dtypes) straight into place.
        vector[offset : offset + spec.size] = arrays[spec.name].ravel(order="C")
        offset += spec.size
    return vector, manifest


def unflatten(vector: np.ndarray, manifest: FlatManifest) -> dict[str, np.ndarray]:
    """Cut a flat float32 vector back into named arrays (new copies, not views).

    Restores exactly what `flatten` produced. Other float32 values restore to float16
    parameters rounded to nearest; an integer parameter must receive integral values in its
    dtype's range, else ValueError. Raises ValueError when the vector is not 1-D float32 of
    the manifest's length.
    """
    flat = np.asarray(vector)
    if flat.dtype != FLAT_DTYPE or flat.ndim != 1:
        raise ValueError(
            f"expected a 1-D float32 vector, got {flat.ndim}-D {flat.dtype}; "
            "pass the vector flatten() returned"
        )
    if flat.size != manifest.size:
        raise ValueError(
            f"vector has {flat.size} values but the manifest describes {manifest.size}; "
            "it belongs to a different model layout (compare manifest digests)"
        )
    restored: dict[str, np.ndarray] = {}
    offset = 0
    for spec in manifest.specs:
        part = flat[offset : offset + spec.size]
        offset += spec.size
        target = np.dtype(spec.dtype)
        if target.kind in "iu" and part.size:
            limits = np.iinfo(target)
            # Checked before the cast, which would wrap or truncate without a word.
            if not (
                np.array_equal(np.rint(part), part)
                and limits.min <= part.min()
                and part.max() <= limits.max
            ):
                raise ValueError(
                    f"parameter {spec.name!r} is {spec.dtype}, but the vector holds values "
                    "that are not integers in its range; only restore vectors made by flatten()"
                )
        array = part.astype(target).reshape(spec.shape)
        restored[spec.name] = array
    return restored
