"""The federation manifest: validation, canonical bytes, signatures, diff."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tessera.crypto.signing import (
    SignatureDomain,
    generate_signing_key,
    public_key_bytes,
    sign_message,
)
from tessera.errors import AuthenticationError, ConfigError
from tessera.governance.manifest import (
    canonical_bytes,
    check_successor,
    diff,
    dumps_manifest,
    load_manifest,
    loads_manifest,
    manifest_from_dict,
    sign_manifest,
    study_hash,
    verify_manifest,
)
from tests.support.governance import build_federation, manifest_document

DATA = Path(__file__).parents[1] / "data" / "governance"
# Recorded once from the example file; they pin the canonical encoding across releases.
EXAMPLE_CANONICAL_SHA256 = "4052bbe6294a7d55cb14955e816a6268bae7445a140b5c24830cb4e60678151e"
EXAMPLE_STUDY_HASHES = {
    "chest-xray": "7088dda4dedb073e9e083a426bb27419d5a1d9f03b46ed3ddd5351d6d2e40ab1",
    "bone-age": "1abd16482fb20aa4b2898f6f00c673bafeebd28f9a9fac6e1e50d97526a426e1",
}


def example_key(name: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(
        hashlib.sha256(b"tessera-example/" + name.encode()).digest()
    )


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory):
    return build_federation(tmp_path_factory.mktemp("fed"), n_sites=3, n_aggregators=2)


@pytest.fixture
def document(fed) -> dict[str, Any]:
    keys, hpke = fed.keys, fed.hpke_keys
    return manifest_document(keys, hpke, fed.site_ids, fed.aggregator_ids)


def test_example_manifest_matches_its_recorded_vectors() -> None:
    manifest = load_manifest(DATA / "federation-manifest.toml")
    verify_manifest(manifest, public_key_bytes(example_key("coordinator")))
    assert hashlib.sha256(canonical_bytes(manifest)).hexdigest() == EXAMPLE_CANONICAL_SHA256
    for study in manifest.studies:
        assert study_hash(study).hex() == EXAMPLE_STUDY_HASHES[study.id]
    # Ed25519 is deterministic: re-signing gives the recorded signature byte for byte.
    assert sign_manifest(manifest, example_key("coordinator")).signature == manifest.signature


def test_canonical_bytes_are_stable_under_toml_reformatting() -> None:
    original = load_manifest(DATA / "federation-manifest.toml")
    reformatted = load_manifest(DATA / "federation-manifest-reformatted.toml")
    assert (DATA / "federation-manifest.toml").read_text() != (
        DATA / "federation-manifest-reformatted.toml"
    ).read_text()
    assert canonical_bytes(reformatted) == canonical_bytes(original)
    assert [study_hash(s) for s in reformatted.studies] == [study_hash(s) for s in original.studies]
    verify_manifest(reformatted, original.coordinator.key)


def test_written_manifest_reads_back_identical(fed) -> None:
    again = loads_manifest(dumps_manifest(fed.manifest))
    assert again == fed.manifest
    verify_manifest(again, fed.coordinator_public)


def test_label_order_is_a_term(document) -> None:
    swapped = copy.deepcopy(document)
    swapped["studies"][0]["labels"] = ["pneumonia", "normal"]
    a, b = manifest_from_dict(document), manifest_from_dict(swapped)
    assert study_hash(a.studies[0]) != study_hash(b.studies[0])
    assert canonical_bytes(a) != canonical_bytes(b)


def test_manifest_signed_by_a_non_coordinator_key_is_rejected(fed) -> None:
    intruder = generate_signing_key()
    forged = dataclasses.replace(
        fed.manifest,
        signature=sign_message(intruder, SignatureDomain.MANIFEST, canonical_bytes(fed.manifest)),
    )
    with pytest.raises(AuthenticationError):
        verify_manifest(forged, fed.coordinator_public)
    with pytest.raises(AuthenticationError):
        verify_manifest(forged, None)


def test_manifest_naming_a_new_coordinator_is_rejected_by_the_pinned_key(fed) -> None:
    intruder = generate_signing_key()
    coup = dataclasses.replace(
        fed.manifest,
        coordinator=dataclasses.replace(fed.manifest.coordinator, key=public_key_bytes(intruder)),
    )
    coup = sign_manifest(coup, intruder)
    verify_manifest(coup, None)  # self-consistent, which is why callers pin the key
    with pytest.raises(AuthenticationError):
        verify_manifest(coup, fed.coordinator_public)


def test_signing_with_a_non_coordinator_key_is_refused(fed) -> None:
    with pytest.raises(ConfigError, match="not the manifest's coordinator key"):
        sign_manifest(fed.manifest, fed.keys["steward-site-1"])


def test_unsigned_and_altered_manifests_are_rejected(fed) -> None:
    unsigned = dataclasses.replace(fed.manifest, signature=None)
    with pytest.raises(AuthenticationError, match="not signed"):
        verify_manifest(unsigned, fed.coordinator_public)
    text = fed.manifest_path.read_text()
    assert "epsilon = 8.0" in text
    altered = loads_manifest(text.replace("epsilon = 8.0", "epsilon = 80.0"))
    with pytest.raises(AuthenticationError):
        verify_manifest(altered, fed.coordinator_public)


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split("/")
    node: Any = doc
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("studies/0/dp/epsilon", _DELETE, r"studies\[0\]\.dp\.epsilon is missing"),
        ("studies/0/dp/epsilon", -1.0, r"studies\[0\]\.dp\.epsilon: expected a finite number"),
        ("studies/0/dp/delta", 1.5, r"dp\.delta: .*below 1\.0"),
        ("studies/0/max_round", 3, r"unknown key 'max_round'"),
        ("studies/0/min_participants", 1, r"min_participants: expected an integer >= 2"),
        ("studies/0/min_participants", 4, r"more than the 3 sites"),
        ("studies/0/expires", "2027-06-30", r"expires: expected a TOML date"),
        ("studies/0/architectures", [], r"architectures: expected a non-empty list"),
        ("studies/0/labels", ["a", "a"], r"labels: .* lists an entry twice"),
        ("studies/0/preprocessing", {"crop": {"x": 1}}, r"nested tables are not allowed"),
        ("studies/0/id", "chest/xray", r"is not a valid id"),
        ("studies/0/id", "chest-xray\n", r"is not a valid id"),
        ("sites/1/id", "site-1", r"id 'site-1' appears twice"),
        ("sites/0/node_key", "AAAA", r"sites\[0\]\.node_key: .* not a raw 32-byte public key"),
        ("sites/0/stewards", [], r"sites\[0\]\.stewards: expected at least 1"),
        ("federation/version", 0, r"federation\.version: expected an integer >= 1"),
        ("format", "tessera-manifest/9", r"is not supported"),
        ("extra", 1, r"unknown key 'extra'"),
    ],
)
def test_invalid_manifests_name_the_key_and_the_fix(document, path, value, message) -> None:
    _set(document, path, value)
    with pytest.raises(ConfigError, match=message):
        loads_manifest(tomli_w.dumps(document))


def test_a_single_aggregator_is_refused(document) -> None:
    document["aggregators"] = document["aggregators"][:1]
    with pytest.raises(ConfigError, match=r"aggregators: expected at least 2 entries"):
        manifest_from_dict(document)


def test_one_key_for_two_principals_is_refused(document) -> None:
    document["sites"][0]["stewards"][0]["key"] = document["coordinator"]["key"]
    with pytest.raises(ConfigError, match="same public key"):
        manifest_from_dict(document)


def test_bad_toml_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        loads_manifest("[federation\nid = 1")


def test_study_hash_changes_with_every_term(document) -> None:
    base = study_hash(manifest_from_dict(document).studies[0])
    changes = {
        "purpose": "other purpose",
        "labels": ["normal", "pneumonia", "effusion"],
        "architectures": ["small-cnn-v1"],
        "preprocessing": {"size": 32, "channels": 1, "window": "lung"},
        "min_participants": 3,
        "max_rounds": 21,
        "clip_norm": 0.9,
        "dp": {"epsilon": 8.0, "delta": 1e-6},
    }
    for key, value in changes.items():
        changed = copy.deepcopy(document)
        changed["studies"][0][key] = value
        assert study_hash(manifest_from_dict(changed).studies[0]) != base, key


def test_diff_lists_each_change_with_old_and_new(fed, document) -> None:
    old = manifest_from_dict(document)
    new_doc = copy.deepcopy(document)
    new_doc["federation"]["version"] = 2
    new_doc["studies"][0]["dp"]["epsilon"] = 4.0
    new_doc["studies"][0]["architectures"] = ["small-cnn-v1"]
    removed = new_doc["sites"].pop()
    new = manifest_from_dict(new_doc)
    lines = [str(change) for change in diff(old, new)]
    assert lines[0] == "federation.version: 1 -> 2"
    assert "sites[site-3]: " in lines[1] and lines[1].endswith(" -> (absent)")
    assert removed["id"] in lines[1]
    assert lines[2:] == [
        'studies[chest-xray].architectures: ["resnet18-v1", "small-cnn-v1"] -> ["small-cnn-v1"]',
        "studies[chest-xray].dp.epsilon: 8.0 -> 4.0",
    ]
    assert diff(old, old) == []
    assert [c.path for c in diff(new, old)][1] == "sites[site-3]"


def test_successor_must_be_a_newer_version_of_the_same_federation(document) -> None:
    current = manifest_from_dict(document)
    newer = copy.deepcopy(document)
    newer["federation"]["version"] = 2
    check_successor(current, manifest_from_dict(newer))
    with pytest.raises(ConfigError, match="not newer"):
        check_successor(current, current)
    other = copy.deepcopy(newer)
    other["federation"]["id"] = "other-federation"
    with pytest.raises(ConfigError, match="federation 'other-federation'"):
        check_successor(current, manifest_from_dict(other))


POSITIVE = st.floats(min_value=1e-12, max_value=1e6, allow_nan=False, allow_infinity=False)
LABELS = st.lists(st.text(min_size=1, max_size=8).filter(str.strip), min_size=1, max_size=5)
SCALAR = st.booleans() | st.integers(-(2**40), 2**40) | POSITIVE | st.text(max_size=8)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    epsilon=POSITIVE,
    delta=st.floats(min_value=1e-300, max_value=0.999, allow_nan=False),
    clip=POSITIVE,
    labels=LABELS.filter(lambda xs: len(set(xs)) == len(xs)),
    preprocessing=st.dictionaries(st.text(min_size=1, max_size=8), SCALAR, max_size=4),
    order=st.permutations(range(3)),
)
def test_any_valid_terms_round_trip_and_ignore_table_order(
    document, epsilon, delta, clip, labels, preprocessing, order
) -> None:
    doc = copy.deepcopy(document)
    doc["studies"][0].update(
        dp={"epsilon": epsilon, "delta": delta},
        clip_norm=clip,
        labels=labels,
        preprocessing=preprocessing,
    )
    manifest = loads_manifest(tomli_w.dumps(doc))
    assert loads_manifest(dumps_manifest(manifest)) == manifest
    assert manifest.studies[0].dp.epsilon == epsilon
    doc["sites"] = [doc["sites"][i] for i in order]
    shuffled = loads_manifest(tomli_w.dumps(doc))
    assert canonical_bytes(shuffled) == canonical_bytes(manifest)
