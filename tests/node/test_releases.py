"""The node's model store: real jointly signed releases with real ONNX exports; refusals of a
release one aggregator signed or whose ONNX was tampered with; pin and rollback."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from node.errors import NodeError
from node.round.releases import (
    CARD_FILE,
    ONNX_FILE,
    RELEASE_FILE,
    WEIGHTS_FILE,
    ModelFileDamaged,
    ModelStore,
    ReleaseRefused,
    accept_release,
)
from tessera.crypto.signing import generate_signing_key
from tessera.errors import AuthenticationError
from tessera.governance.audit import AuditLog, read_entries
from tessera.models.weights import state_arrays, weights_bytes
from tessera.wire.envelopes import seal_envelope
from tessera.wire.release import ModelRelease, ReleaseBundle, build_release, sign_release
from tests.support.models import export_model, small_model

FED, STUDY = "fed-1", "chest-xray"
AGGREGATORS = ("agg-1", "agg-2")


@dataclasses.dataclass(frozen=True)
class Models:
    """Two real models' weights and ONNX exports, made once for the module."""

    weights: tuple[bytes, bytes]
    onnx: tuple[bytes, bytes]


@pytest.fixture(scope="module")
def models() -> Models:
    exported = []
    for seed in (0, 1):
        model, spec = small_model(seed)
        exported.append((weights_bytes(state_arrays(model)), export_model(model, "1", spec)))
    return Models((exported[0][0], exported[1][0]), (exported[0][1], exported[1][1]))


@pytest.fixture(scope="module")
def keys() -> dict[str, Ed25519PrivateKey]:
    return {agg: generate_signing_key() for agg in AGGREGATORS}


def public(keys: dict[str, Ed25519PrivateKey]) -> dict[str, Ed25519PublicKey]:
    return {agg: key.public_key() for agg, key in keys.items()}


def unsigned(models: Models, version: int, which: int = 0, *, onnx: bytes | None = None,
             study: str = STUDY) -> ModelRelease:  # fmt: skip
    card = json.dumps({"study": study, "version": version, "round": version}).encode()
    bundle = ReleaseBundle(models.weights[which], onnx or models.onnx[which], card)
    return build_release(FED, study, version, version, bytes(32), bundle)


def signed_by(release: ModelRelease, keys: dict[str, Ed25519PrivateKey], *signers: str) -> bytes:
    for signer in signers or AGGREGATORS:
        release = sign_release(release, signer, keys[signer])
    return release.to_bytes()


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "state", FED, STUDY, AuditLog.open(tmp_path / "audit.log"))


def outcomes(store: ModelStore) -> list[tuple[str, str | None]]:
    assert store.audit is not None
    return [(e.fields["outcome"], e.fields.get("reason")) for e in read_entries(store.audit.path)]


def test_a_jointly_signed_release_is_installed_and_survives_a_restart(
    models: Models, keys: dict[str, Ed25519PrivateKey], store: ModelStore
) -> None:
    record = accept_release(signed_by(unsigned(models, 1), keys), public(keys), store)
    assert record.version == 1 and record.signers == AGGREGATORS
    folder = store.folder(1)
    assert folder == store.root / "1"
    assert (folder / WEIGHTS_FILE).read_bytes() == models.weights[0]
    assert (folder / ONNX_FILE).read_bytes() == models.onnx[0]
    assert json.loads((folder / CARD_FILE).read_text())["version"] == 1
    assert store.onnx_bytes(1) == models.onnx[0]
    assert store.current() == 1
    # The retained release again (a reconnect) is a no-op, not a conflict.
    again = accept_release(signed_by(unsigned(models, 1), keys), public(keys), store)
    assert again == record
    assert outcomes(store) == [("accepted", None)]
    reopened = ModelStore(store.root.parent, FED, STUDY)
    assert reopened.current() == 1 and reopened.versions() == [record]
    assert sorted(p.name for p in store.root.iterdir()) == [".lock", "1", "state.json"]  # no temp
    # A release inside an aggregator's signed envelope is accepted the same way.
    wrapped = seal_envelope(ModelRelease.from_bytes(signed_by(unsigned(models, 2, 1), keys)),
                            "agg-2", keys["agg-2"])  # fmt: skip
    assert accept_release(wrapped, public(keys), store).version == 2
    assert store.current() == 2


def test_a_release_signed_by_one_aggregator_is_refused_and_audited(
    models: Models, keys: dict[str, Ed25519PrivateKey], store: ModelStore
) -> None:
    for signers in (("agg-1",), ("agg-2",)):
        data = signed_by(unsigned(models, 1), keys, *signers)
        with pytest.raises(AuthenticationError):
            accept_release(data, public(keys), store)
    # A stranger's signature does not stand in for a missing aggregator's.
    stranger = {"agg-1": keys["agg-1"], "agg-2": generate_signing_key()}
    with pytest.raises(AuthenticationError):
        accept_release(signed_by(unsigned(models, 1), stranger), public(keys), store)
    assert store.current() is None and not store.folder(1).exists()
    assert outcomes(store) == [("refused", "not-verified")] * 3


def test_a_tampered_onnx_is_refused_and_nothing_is_written(
    models: Models, keys: dict[str, Ed25519PrivateKey], store: ModelStore
) -> None:
    good = ModelRelease.from_bytes(signed_by(unsigned(models, 1), keys))
    bundle = ReleaseBundle.from_bytes(good.payload)
    onnx = bytearray(bundle.onnx)
    onnx[len(onnx) // 2] ^= 0xFF  # one byte inside the weights of the graph
    swapped = ReleaseBundle(bundle.weights, bytes(onnx), bundle.card).to_bytes()
    tampered = dataclasses.replace(good, payload=swapped)  # same length: signatures still parse
    with pytest.raises(AuthenticationError):
        accept_release(tampered.to_bytes(), public(keys), store)
    # Re-hashed but not re-signed: the header no longer matches the signatures.
    rehashed = dataclasses.replace(
        unsigned(models, 1, onnx=bytes(onnx)), signatures=good.signatures
    )
    with pytest.raises(AuthenticationError):
        accept_release(rehashed.to_bytes(), public(keys), store)
    # Signed by both, but the ONNX is another model's export: refused by its metadata.
    mixed = signed_by(unsigned(models, 1, onnx=models.onnx[1]), keys)
    with pytest.raises(ReleaseRefused, match="onnx-not-of-these-weights"):
        accept_release(mixed, public(keys), store)
    assert store.current() is None and not store.folder(1).exists()
    assert outcomes(store) == [("refused", "not-verified")] * 2 + [
        ("refused", "onnx-not-of-these-weights")
    ]


def test_other_studies_conflicting_versions_and_garbage_are_refused(
    models: Models, keys: dict[str, Ed25519PrivateKey], store: ModelStore
) -> None:
    with pytest.raises(ReleaseRefused, match="wrong-study"):
        accept_release(signed_by(unsigned(models, 1, study="other"), keys), public(keys), store)
    with pytest.raises(ReleaseRefused, match="malformed"):
        accept_release(b"\x01\x02 not a release", public(keys), store)
    accept_release(signed_by(unsigned(models, 1), keys), public(keys), store)
    with pytest.raises(ReleaseRefused, match="version-conflict"):
        accept_release(signed_by(unsigned(models, 1, 1), keys), public(keys), store)
    assert store.onnx_bytes(1) == models.onnx[0]  # the first version-1 model stays
    assert [reason for _, reason in outcomes(store)] == [
        "wrong-study", "malformed", None, "version-conflict"
    ]  # fmt: skip


def test_pin_and_rollback_choose_the_served_version_and_persist(
    models: Models, keys: dict[str, Ed25519PrivateKey], store: ModelStore
) -> None:
    for version in (1, 2, 3):
        accept_release(signed_by(unsigned(models, version, version % 2), keys), public(keys), store)
    assert store.current() == 3 and store.pinned is None
    assert store.rollback() == 2 and store.current() == 2
    assert store.rollback() == 1 and store.current() == 1
    with pytest.raises(NodeError, match="no version before 1"):
        store.rollback()
    # A new release while pinned is stored, but does not replace the pinned model.
    accept_release(signed_by(unsigned(models, 4), keys), public(keys), store)
    assert store.current() == 1
    reopened = ModelStore(store.root.parent, FED, STUDY)
    assert reopened.current() == 1 and reopened.pinned == 1
    store.pin(3)
    assert store.current() == 3
    with pytest.raises(NodeError, match="not in the model store"):
        store.pin(9)
    store.unpin()
    assert store.current() == 4 and ModelStore(store.root.parent, FED, STUDY).current() == 4
    assert [o for o, _ in outcomes(store)] == [
        "accepted", "accepted", "accepted", "rolled-back", "rolled-back", "accepted", "pinned",
        "unpinned",
    ]  # fmt: skip


def test_a_damaged_disk_copy_or_state_is_never_served(
    models: Models, keys: dict[str, Ed25519PrivateKey], store: ModelStore
) -> None:
    accept_release(signed_by(unsigned(models, 1), keys), public(keys), store)
    path = store.folder(1) / ONNX_FILE
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    with pytest.raises(NodeError, match="damaged"):
        store.onnx_bytes(1)
    store.state_path.write_text("{ torn")
    with pytest.raises(NodeError, match="unreadable"):
        ModelStore(store.root.parent, FED, STUDY)
    other = {"format": 1, "federation_id": FED, "study_id": "x", "models": [], "pinned": None}
    store.state_path.write_text(json.dumps(other))
    with pytest.raises(NodeError, match="its own state folder"):
        ModelStore(store.root.parent, FED, STUDY)


def test_damaged_files_are_named_and_rewritten_from_a_verified_copy_only(
    models: Models, keys: dict[str, Ed25519PrivateKey], store: ModelStore
) -> None:
    """Issue #19, point 6: a truncated safetensors is a clear error naming the fix, not a
    parser traceback; the version's own release.bin repairs it while that verifies; once it
    does not, a copy of the release (what an aggregator sends again) repairs it."""
    release = signed_by(unsigned(models, 1), keys)
    accept_release(release, public(keys), store)
    folder = store.folder(1)
    (folder / WEIGHTS_FILE).write_bytes(models.weights[0][:100])
    with pytest.raises(ModelFileDamaged, match=r"model.safetensors does not match.*re-fetch"):
        store.weights_bytes(1)
    assert isinstance(store.damaged(1), ModelFileDamaged)
    assert store.repair_from_disk(1, public(keys))  # from its own release.bin
    assert store.weights_bytes(1) == models.weights[0] and store.damaged(1) is None

    (folder / ONNX_FILE).unlink()
    (folder / RELEASE_FILE).write_bytes(release[: len(release) // 2])
    with pytest.raises(ModelFileDamaged, match=r"model\.onnx is missing"):
        store.onnx_bytes(1)
    assert not store.repair_from_disk(1, public(keys))  # release.bin no longer verifies
    forged = {"agg-1": keys["agg-1"], "agg-2": generate_signing_key()}
    with pytest.raises(AuthenticationError):  # a copy not signed by every aggregator
        accept_release(signed_by(unsigned(models, 1), forged), public(keys), store)
    assert not (folder / ONNX_FILE).exists()
    assert accept_release(release, public(keys), store).version == 1  # the copy arrives
    assert store.onnx_bytes(1) == models.onnx[0] and store.damaged(1) is None
    assert (folder / RELEASE_FILE).read_bytes() == release
    assert [o for o, _ in outcomes(store)] == ["accepted", "repaired", "refused", "repaired"]
