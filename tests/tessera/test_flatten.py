"""Canonical flattening: exact round trips, a stable order, and a layout digest."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from tessera.crypto.flatten import FlatManifest, ParamSpec, flatten, unflatten

KNOWN_DIGEST = "195ea42a305ed62afdbf3071c3d83bbac9f466293a08201971a68e3e6da1a7fc"
EXACT = ["float16", "float32", "int8", "uint8", "int16", "uint16"]


def model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(4).astype(np.float16),
        "bn.scale": np.float32(1.5) * np.ones((), dtype=np.float32),
        "fc.weight": rng.standard_normal((2, 5)).astype(np.float32).T,  # not C-contiguous
        "embedding.index": np.arange(-3, 3, dtype=np.int8),
        "empty": np.zeros((0, 7), dtype=np.float32),
    }


@st.composite
def parameter_sets(draw: st.DrawFn) -> dict[str, np.ndarray]:
    names = draw(st.lists(st.text(min_size=1, max_size=12), min_size=0, max_size=6, unique=True))
    result = {}
    for name in names:
        dtype = np.dtype(draw(st.sampled_from(EXACT)))
        shape = draw(array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
        elements = st.floats(width=16, allow_nan=False) if dtype.kind == "f" else None
        result[name] = draw(arrays(dtype, shape, elements=elements))
    return result


@given(parameter_sets())
def test_flatten_then_unflatten_restores_every_parameter_exactly(
    params: dict[str, np.ndarray],
) -> None:
    vector, manifest = flatten(params)
    assert vector.dtype == np.float32 and vector.ndim == 1
    assert vector.size == manifest.size == sum(a.size for a in params.values())
    restored = unflatten(vector, manifest)
    assert set(restored) == set(params)
    for name, original in params.items():
        assert restored[name].dtype == original.dtype
        assert restored[name].shape == original.shape
        np.testing.assert_array_equal(restored[name], original)


def test_mixed_model_round_trip_and_layout() -> None:
    params = model()
    vector, manifest = flatten(params)
    assert [spec.name for spec in manifest.specs] == sorted(params)
    # Sorted by name, each parameter in C order.
    np.testing.assert_array_equal(vector[:1], [1.5])  # "bn.scale" sorts first
    assert vector.size == 1 + 4 + 108 + 0 + 6 + 10
    np.testing.assert_array_equal(vector[1:5], params["conv.bias"].astype(np.float32))
    np.testing.assert_array_equal(vector[-10:], params["fc.weight"].ravel(order="C"))
    restored = unflatten(vector, manifest)
    for name, original in params.items():
        np.testing.assert_array_equal(restored[name], original)
        assert restored[name].dtype == original.dtype


def test_order_does_not_depend_on_insertion_order() -> None:
    params = model()
    backwards = dict(reversed(list(params.items())))
    first, manifest = flatten(params)
    second, other = flatten(backwards)
    np.testing.assert_array_equal(first, second)
    assert manifest == other and manifest.digest() == other.digest()


def test_unflatten_returns_copies() -> None:
    vector, manifest = flatten({"w": np.ones(3, dtype=np.float32)})
    restored = unflatten(vector, manifest)
    restored["w"][0] = 7
    assert vector[0] == 1


def test_manifest_digest_known_answer() -> None:
    manifest = FlatManifest(
        (ParamSpec("bias", (4,), "float32"), ParamSpec("weight", (4, 3), "float16"))
    )
    # Recorded: a change here means every deployed layout name changes.
    assert manifest.digest().hex() == KNOWN_DIGEST


@pytest.mark.parametrize(
    "changed",
    [
        (ParamSpec("bias", (4,), "float32"), ParamSpec("weights", (4, 3), "float16")),
        (ParamSpec("bias", (4,), "float32"), ParamSpec("weight", (3, 4), "float16")),
        (ParamSpec("bias", (4,), "float32"), ParamSpec("weight", (12,), "float16")),
        (ParamSpec("bias", (4,), "float32"), ParamSpec("weight", (4, 3), "float32")),
        (ParamSpec("bias", (4,), "float32"), ParamSpec("weight", (4, 3, 1), "float16")),
        (ParamSpec("bias", (4,), "float32"),),
        (ParamSpec("bia", (4,), "float32"), ParamSpec("sweight", (4, 3), "float16")),
    ],
)
def test_manifest_digest_changes_with_any_part_of_the_layout(
    changed: tuple[ParamSpec, ...],
) -> None:
    base = FlatManifest(
        (ParamSpec("bias", (4,), "float32"), ParamSpec("weight", (4, 3), "float16"))
    )
    assert FlatManifest(changed).digest() != base.digest()


def test_unflatten_refuses_a_vector_of_another_layout() -> None:
    vector, manifest = flatten(model())
    with pytest.raises(ValueError, match="different model layout"):
        unflatten(vector[:-1], manifest)
    with pytest.raises(ValueError, match="different model layout"):
        unflatten(np.append(vector, np.float32(0)), manifest)
    with pytest.raises(ValueError, match="1-D float32"):
        unflatten(vector.astype(np.float64), manifest)
    with pytest.raises(ValueError, match="1-D float32"):
        unflatten(vector.reshape(1, -1), manifest)


@pytest.mark.parametrize("value", [0.5, 128.0, -129.0, np.nan])
def test_unflatten_refuses_values_an_integer_parameter_cannot_hold(value: float) -> None:
    vector, manifest = flatten({"index": np.zeros(3, dtype=np.int8)})
    vector[1] = value
    with pytest.raises(ValueError, match="not integers in its range"):
        unflatten(vector, manifest)


@pytest.mark.parametrize("dtype", ["float64", "int32", "int64", "bool", "complex64"])
def test_flatten_refuses_dtypes_float32_cannot_hold_exactly(dtype: str) -> None:
    with pytest.raises(ValueError, match="cast it to float32"):
        flatten({"ok": np.zeros(2, dtype=np.float32), "wide": np.zeros(2, dtype=dtype)})


def test_manifest_refuses_an_order_that_is_not_canonical() -> None:
    with pytest.raises(ValueError, match="sorted by name"):
        FlatManifest((ParamSpec("b", (1,), "float32"), ParamSpec("a", (1,), "float32")))
    with pytest.raises(ValueError, match="sorted by name"):
        FlatManifest((ParamSpec("a", (1,), "float32"), ParamSpec("a", (1,), "float32")))
    with pytest.raises(ValueError, match="shape"):
        ParamSpec("a", (-1,), "float32")
