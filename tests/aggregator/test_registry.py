"""Model cards, release assembly and the registry (every version kept, listed, verified)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aggregator.errors import RegistryError
from aggregator.model_card import ModelCard, card_from_bytes
from aggregator.registry import GENESIS_PARENT, Registry, assemble_release, weights_bytes
from aggregator.store import Store
from aggregator.strategies import ServerState, SwitchRecord, server_state_from_bytes
from tessera.crypto.signing import generate_signing_key
from tessera.errors import AuthenticationError
from tessera.wire.release import sign_release

KEYS = {"agg-1": generate_signing_key(), "agg-2": generate_signing_key()}
PUBLIC = {name: key.public_key() for name, key in KEYS.items()}


def card(version: int, parent: bytes = GENESIS_PARENT, **changes: object) -> ModelCard:
    fields: dict[str, object] = dict(
        federation_id="fed-1",
        study_id="study-1",
        version=version,
        round=version,
        parent_hash=parent,
        participant_count=3,
        min_participants=3,
        algorithm="fedavg",
        optimizer="fedadam",
        adaptive=True,
        switches=(SwitchRecord(2, "fedavg", "fedsgd", 2.5, 0.5, 2.0, "why").to_dict(),),
        epsilon_per_site={"site-b": 1.5, "site-a": 0.75, "site-c": 2.0},
        validation={"loss": 0.42, "accuracy": 0.9},
        architecture="tiny-cnn",
    )
    fields.update(changes)
    return ModelCard(**fields)  # type: ignore[arg-type]


def params(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.standard_normal((4, 3)).astype(np.float32),
        "fc.bias": rng.standard_normal(5).astype(np.float32),
    }


def signed(model_card: ModelCard, seed: int, onnx: bytes = b"onnx-bytes"):
    release = assemble_release(card=model_card, params=params(seed), onnx=onnx)
    for name, key in KEYS.items():
        release = sign_release(release, name, key)
    return release


def test_cards_are_canonical_and_keep_sites_private_below_k() -> None:
    first = card(1)
    again = card(1, epsilon_per_site={"site-c": 2.0, "site-a": 0.75, "site-b": 1.5})
    assert first.to_bytes() == again.to_bytes()
    parsed = card_from_bytes(first.to_bytes())
    assert parsed["participants"] == {"count": 3, "minimum": 3}
    assert parsed["privacy"]["epsilon_per_site"]["site-a"] == 0.75
    assert parsed["strategy"]["switches"][0]["to"] == "fedsgd"
    few = card_from_bytes(card(1, epsilon_per_site={"site-a": 0.5, "site-b": 0.9}).to_bytes())
    assert few["privacy"] == {"sites": 2, "epsilon_max": 0.9}
    assert "site-a" not in json.dumps(few)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"participant_count": 2}, "k=3"),
        ({"validation": {"loss": float("nan")}}, "loss"),
        ({"optimizer": "adamw"}, "adamw"),
        ({"parent_hash": b"short"}, "32 bytes"),
    ],
)
def test_bad_cards_are_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(RegistryError, match=message):
        card(1, **changes)


def test_weights_bytes_do_not_depend_on_insertion_order() -> None:
    forward = params(1)
    backward = dict(reversed(list(forward.items())))
    assert weights_bytes(forward) == weights_bytes(backward)
    assert weights_bytes(forward) != weights_bytes(params(2))


def test_registry_keeps_lists_and_verifies_every_version(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.sqlite3", tmp_path / "shares")
    registry = Registry(store, tmp_path / "models")
    parent = GENESIS_PARENT
    for version in (1, 2, 3):
        release = signed(card(version, parent), seed=version)
        shown = registry.register(
            release,
            PUBLIC,
            server_state=ServerState(step=version, m=np.ones(3)),
            next_algorithm="fedsgd",
        )
        assert shown.card["version"] == version and shown.release_path.exists()
        parent = release.model_hash
    store.close()

    store = Store(tmp_path / "state.sqlite3", tmp_path / "shares")  # after a restart
    registry = Registry(store, tmp_path / "models")
    versions = registry.list("study-1")
    assert [v.version for v in versions] == [1, 2, 3]
    assert versions[1].parent_hash == versions[0].model_hash  # the lineage is kept
    assert all(len(v.signatures) == 2 for v in versions)
    for version in (1, 2, 3):
        weights = registry.weights("study-1", version)
        np.testing.assert_array_equal(weights["fc.bias"], params(version)["fc.bias"])
    latest = registry.latest("study-1")
    assert latest is not None and latest.record.version == 3
    state = store.server_state("study-1")
    assert state is not None and state.round == 3 and state.algorithm == "fedsgd"
    assert state.path is not None and not Path(state.path).is_absolute()  # moves with the folder
    assert server_state_from_bytes(registry.resolve(state.path).read_bytes()).step == 3
    with pytest.raises(RegistryError, match="no model version 9"):
        registry.show("study-1", 9)


def test_tampered_files_are_detected(tmp_path: Path) -> None:
    registry = Registry(Store(tmp_path / "s.sqlite3", tmp_path / "shares"), tmp_path / "models")
    shown = registry.register(signed(card(1), seed=1), PUBLIC)
    shown.onnx_path.write_bytes(b"evil")
    with pytest.raises(RegistryError, match="does not match"):
        registry.verify("study-1", 1)
    shown.weights_path.unlink()
    with pytest.raises(RegistryError, match="missing"):
        registry.weights("study-1", 1)


def test_only_fully_signed_new_versions_are_registered(tmp_path: Path) -> None:
    registry = Registry(Store(tmp_path / "s.sqlite3", tmp_path / "shares"), tmp_path / "models")
    half = sign_release(
        assemble_release(card=card(1), params=params(1), onnx=b"x"), "agg-1", KEYS["agg-1"]
    )
    with pytest.raises(AuthenticationError):
        registry.register(half, PUBLIC)
    assert registry.list("study-1") == []
    registry.register(signed(card(1), seed=1), PUBLIC)
    with pytest.raises(RegistryError, match="never replaced"):
        registry.register(signed(card(1), seed=5), PUBLIC)
    with pytest.raises(RegistryError, match="ONNX export is empty"):
        assemble_release(card=card(2), params=params(2), onnx=b"")


WRITER = r"""
import sys
from pathlib import Path
import numpy as np
from aggregator.registry import GENESIS_PARENT, Registry
from aggregator.store import Store
from aggregator.strategies import ServerState
sys.path.insert(0, sys.argv[2])
from test_registry import PUBLIC, card, signed

root = Path(sys.argv[1])
registry = Registry(Store(root / "s.sqlite3", root / "shares"), root / "models")
parent, version = GENESIS_PARENT, 0
while True:
    version += 1
    release = signed(card(version, parent), seed=version, onnx=bytes(300_000))
    registry.register(release, PUBLIC, server_state=ServerState(version, np.ones(50_000)))
    parent = release.model_hash
    print(version, flush=True)
"""


@pytest.mark.parametrize("versions_before_kill", [2, 5])
def test_sigkill_while_registering_leaves_a_consistent_registry(
    tmp_path: Path, versions_before_kill: int
) -> None:
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path), str(Path(__file__).parent)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout is not None
    for _ in range(versions_before_kill):
        assert writer.stdout.readline(), "the writer died on its own"
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    store = Store(tmp_path / "s.sqlite3", tmp_path / "shares")
    store.integrity_check()
    registry = Registry(store, tmp_path / "models")
    versions = [r.version for r in registry.list("study-1")]
    assert versions == list(range(1, len(versions) + 1))
    assert len(versions) >= versions_before_kill
    for version in versions:
        registry.verify("study-1", version)  # every registered file is whole
    state = store.server_state("study-1")
    assert state is not None and state.round == versions[-1]  # registered with its model
    # The registry goes on: the next version registers even over a half-written folder.
    registry.register(
        signed(card(versions[-1] + 1, registry.list("study-1")[-1].model_hash), seed=99), PUBLIC
    )
