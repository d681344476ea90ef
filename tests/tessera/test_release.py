"""Model releases: joint signatures, the bundle's hashes, and what a node must refuse."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
from wire_examples import example_release

from tessera.crypto.signing import generate_signing_key
from tessera.errors import AuthenticationError, ConfigError
from tessera.wire.envelopes import open_envelope_as, seal_envelope
from tessera.wire.release import (
    ModelRelease,
    ReleaseBundle,
    release_header_bytes,
    sign_release,
    verify_release,
)

KEYS = {name: generate_signing_key() for name in ("agg-1", "agg-2", "agg-3")}
PUBLIC = {name: key.public_key() for name, key in KEYS.items()}
TWO = {name: PUBLIC[name] for name in ("agg-1", "agg-2")}


def _signed_by(*names: str, release: ModelRelease | None = None) -> ModelRelease:
    release = release or example_release()
    for name in names:
        release = sign_release(release, name, KEYS[name])
    return release


def test_release_signed_by_every_aggregator_verifies_and_yields_its_bundle() -> None:
    release = _signed_by("agg-1", "agg-2")
    bundle = verify_release(release, TWO)
    assert bundle == ReleaseBundle.from_bytes(release.payload)
    assert hashlib.sha256(bundle.weights).digest() == release.model_hash


def test_one_missing_signature_is_refused() -> None:
    with pytest.raises(AuthenticationError):
        verify_release(_signed_by("agg-1"), TWO)


def test_a_signature_from_outside_the_federation_is_refused() -> None:
    with pytest.raises(AuthenticationError):
        verify_release(_signed_by("agg-1", "agg-2", "agg-3"), TWO)


def test_fewer_than_two_aggregator_keys_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="at least 2"):
        verify_release(_signed_by("agg-1"), {"agg-1": PUBLIC["agg-1"]})
    with pytest.raises(ConfigError):
        verify_release(_signed_by("agg-1"), {})


def test_signature_by_the_wrong_key_is_refused() -> None:
    release = _signed_by("agg-1", "agg-2")
    swapped = {"agg-1": PUBLIC["agg-2"], "agg-2": PUBLIC["agg-1"]}
    with pytest.raises(AuthenticationError):
        verify_release(release, swapped)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("version", 99),
        ("round", 8),
        ("model_hash", hashlib.sha256(b"other weights").digest()),
        ("parent_hash", b"\x00" * 32),
        ("study_id", "study-2"),
    ],
)
def test_changing_any_header_field_after_signing_is_refused(field: str, value: object) -> None:
    release = dataclasses.replace(_signed_by("agg-1", "agg-2"), **{field: value})
    with pytest.raises(AuthenticationError):
        verify_release(release, TWO)


def test_swapped_payload_is_refused_even_with_valid_signatures() -> None:
    release = _signed_by("agg-1", "agg-2")
    other = ReleaseBundle(weights=b"poisoned", onnx=b"onnx" * 10, card=b'{"round": 7}')
    with pytest.raises(AuthenticationError):
        verify_release(dataclasses.replace(release, payload=other.to_bytes()), TWO)
    with pytest.raises(AuthenticationError):
        verify_release(dataclasses.replace(release, payload=b"not a bundle"), TWO)


def test_signers_must_agree_on_the_same_header() -> None:
    # agg-2 signs a release that differs only in version; its signature cannot be merged.
    one = _signed_by("agg-1")
    other = _signed_by("agg-2", release=dataclasses.replace(example_release(), version=5))
    merged = dataclasses.replace(one, signatures=one.signatures + other.signatures)
    with pytest.raises(AuthenticationError):
        verify_release(merged, TWO)


def test_header_excludes_payload_bytes_and_signatures_but_binds_their_length() -> None:
    release = example_release()
    signed = _signed_by("agg-1", release=release)
    assert release_header_bytes(signed) == release_header_bytes(release)
    assert release.payload not in release_header_bytes(release)
    longer = dataclasses.replace(release, payload=release.payload + b"\x00")
    assert release_header_bytes(longer) != release_header_bytes(release)


def test_signing_refuses_a_payload_that_does_not_match_its_hashes() -> None:
    release = dataclasses.replace(example_release(), payload=b"bad")
    with pytest.raises(AuthenticationError):
        sign_release(release, "agg-1", KEYS["agg-1"])
    with pytest.raises(ValueError, match="already signed"):
        sign_release(_signed_by("agg-1"), "agg-1", KEYS["agg-1"])


def test_release_travels_in_an_envelope_and_still_verifies() -> None:
    release = _signed_by("agg-1", "agg-2")
    data = seal_envelope(release, "agg-2", KEYS["agg-2"])
    opened = open_envelope_as(data, ModelRelease, TWO, max_size=len(data))
    assert verify_release(opened.message, TWO).card == b'{"round": 7}'
