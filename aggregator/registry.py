"""Release bundles and the model registry: every version kept, listed, shown, re-verified.

Assembly: `weights_bytes` turns the new parameters into safetensors bytes (the numpy API, so
no torch here); `assemble_release` packs them with the ONNX export (bytes made elsewhere)
and the model card into a `tessera.wire.release.ReleaseBundle` and an unsigned `ModelRelease`
whose header hashes the three parts. Each aggregator then adds its signature with
`tessera.wire.release.sign_release`, after checking the model hash against weights it computed
itself.

Registry: a fully signed release is verified (`verify_release`, every aggregator's key from
the manifest) and written to `<root>/<study>/<version>/` (weights, ONNX, card, the signed
release message, the server optimiser state), each file atomically; then one store
transaction registers the version together with the optimiser state. The store names each
folder and file relative to the registry's root (`relative_folder`), so a state folder
copied or restored elsewhere reads its own files. Versions are never replaced. A crash
before that transaction leaves an unregistered folder, which the next
registration of that version overwrites file by file.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from safetensors import SafetensorError
from safetensors.numpy import load, save

from aggregator.errors import RegistryError
from aggregator.model_card import ModelCard, card_from_bytes
from aggregator.records import ModelRecord, ServerStateRecord
from aggregator.store import Store
from aggregator.strategies import ServerState, server_state_to_bytes
from tessera.files import PRIVATE_MODE, atomic_write, make_private_dir
from tessera.wire.release import (
    CARD_FILE,
    ONNX_FILE,
    RELEASE_FILE,
    WEIGHTS_FILE,
    ModelRelease,
    ReleaseBundle,
    build_release,
    verify_release,
)

SERVER_STATE_FILE = "server_state.safetensors"
GENESIS_PARENT = bytes(32)


def relative_folder(study_id: str, version: int) -> str:
    """A version's folder as the store names it: relative to the registry's root."""
    return f"{study_id.encode('utf-8').hex()}/{version:010d}"


def weights_bytes(params: Mapping[str, np.ndarray]) -> bytes:
    """Safetensors bytes of the parameters, the same for the same arrays in any process.

    No metadata is written (a timestamp or host name would make aggregators disagree).
    """
    if not params:
        raise RegistryError("a model needs at least one parameter")
    tensors = {name: np.ascontiguousarray(value) for name, value in params.items()}
    return bytes(save(tensors))


def load_weights(data: bytes) -> dict[str, np.ndarray]:
    """Parse safetensors weights; RegistryError if they are not."""
    try:
        return dict(load(data))
    except SafetensorError as exc:
        raise RegistryError(f"weights are not valid safetensors ({exc})") from None


def assemble_release(
    *,
    card: ModelCard,
    params: Mapping[str, np.ndarray],
    onnx: bytes,
) -> ModelRelease:
    """The unsigned release of a new model: bundle, hashes, lineage from the card."""
    if not onnx:
        raise RegistryError("the ONNX export is empty; export the model before releasing it")
    bundle = ReleaseBundle(weights=weights_bytes(params), onnx=onnx, card=card.to_bytes())
    return build_release(
        card.federation_id, card.study_id, card.round, card.version, card.parent_hash, bundle
    )


@dataclass(frozen=True)
class ModelVersion:
    """One registered version, as `Registry.show` gives it."""

    record: ModelRecord
    card: dict[str, Any]
    folder: Path

    @property
    def weights_path(self) -> Path:
        """The safetensors file."""
        return self.folder / WEIGHTS_FILE

    @property
    def onnx_path(self) -> Path:
        """The ONNX export."""
        return self.folder / ONNX_FILE

    @property
    def release_path(self) -> Path:
        """The signed ModelRelease message, ready to republish (retained) after a restart."""
        return self.folder / RELEASE_FILE


class Registry:
    """Every model version of every study this aggregator released, on disk and in SQLite."""

    def __init__(self, store: Store, root: Path) -> None:
        self.store = store
        self.root = Path(root)
        make_private_dir(self.root)

    def _folder(self, study_id: str, version: int) -> Path:
        return self.root / relative_folder(study_id, version)

    def resolve(self, stored: str) -> Path:
        """A folder or file the store names (relative to this registry's root) on disk."""
        return self.root / stored

    def register(
        self,
        release: ModelRelease,
        aggregator_keys: Mapping[str, Ed25519PublicKey],
        *,
        server_state: ServerState | None = None,
        next_algorithm: str = "fedavg",
    ) -> ModelVersion:
        """Verify a fully signed release, write its files, and register the version.

        `aggregator_keys` are every aggregator's keys from the federation manifest;
        verification raises AuthenticationError unless all of them signed. `server_state`
        and `next_algorithm` are what the next round continues from; they are registered in
        the same transaction as the version. RegistryError if the version already exists.
        """
        bundle = verify_release(release, aggregator_keys)
        card = card_from_bytes(bundle.card)
        if (card["study"], card["version"], card["round"]) != (
            release.study_id, release.version, release.round
        ):  # fmt: skip
            raise RegistryError(
                f"the card names study {card['study']} version {card['version']} round "
                f"{card['round']}, the release {release.study_id} {release.version} "
                f"{release.round}; rebuild the release from one card"
            )
        if any(r.version == release.version for r in self.store.list_models(release.study_id)):
            raise RegistryError(
                f"study {release.study_id} already has version {release.version}; "
                "versions are never replaced, release the next one"
            )
        folder = self._folder(release.study_id, release.version)
        make_private_dir(folder)
        for name, data in (
            (WEIGHTS_FILE, bundle.weights),
            (ONNX_FILE, bundle.onnx),
            (CARD_FILE, bundle.card),
            (RELEASE_FILE, release.to_bytes()),
        ):
            atomic_write(folder / name, data, mode=PRIVATE_MODE)
        state_record = None
        if server_state is not None:
            atomic_write(
                folder / SERVER_STATE_FILE, server_state_to_bytes(server_state), mode=PRIVATE_MODE
            )
            path = f"{relative_folder(release.study_id, release.version)}/{SERVER_STATE_FILE}"
            state_record = ServerStateRecord(release.round, next_algorithm, path)
        record = ModelRecord(
            study_id=release.study_id,
            version=release.version,
            round=release.round,
            parent_hash=release.parent_hash,
            model_hash=release.model_hash,
            onnx_hash=release.onnx_hash,
            card_hash=release.card_hash,
            folder=relative_folder(release.study_id, release.version),
            card_json=bundle.card.decode("ascii"),
            signatures=release.signatures,
        )
        self.store.insert_model(record, state_record)
        return ModelVersion(record, card, folder)

    def list(self, study_id: str) -> list[ModelRecord]:
        """Every version of the study, oldest first."""
        return self.store.list_models(study_id)

    def latest(self, study_id: str) -> ModelVersion | None:
        """The newest version, or None before the first release."""
        records = self.list(study_id)
        return None if not records else self.show(study_id, records[-1].version)

    def show(self, study_id: str, version: int) -> ModelVersion:
        """One version's record, parsed card and folder; RegistryError if unknown."""
        for record in self.list(study_id):
            if record.version == version:
                return ModelVersion(
                    record, card_from_bytes(record.card_json.encode()), self.resolve(record.folder)
                )
        raise RegistryError(
            f"study {study_id} has no model version {version}; Registry.list shows the "
            "registered versions"
        )

    def verify(self, study_id: str, version: int) -> ModelVersion:
        """Re-hash a version's files against its registered hashes; RegistryError if any
        file is missing or differs."""
        shown = self.show(study_id, version)
        for name, expected in (
            (WEIGHTS_FILE, shown.record.model_hash),
            (ONNX_FILE, shown.record.onnx_hash),
            (CARD_FILE, shown.record.card_hash),
        ):
            path = shown.folder / name
            try:
                digest = hashlib.sha256(path.read_bytes()).digest()
            except FileNotFoundError:
                raise RegistryError(f"model version {version}: {path} is missing") from None
            if not hmac.compare_digest(digest, expected):
                raise RegistryError(
                    f"model version {version}: {path} does not match its registered hash; "
                    "restore it from the signed release (release.bin) or another aggregator"
                )
        return shown

    def weights(self, study_id: str, version: int) -> dict[str, np.ndarray]:
        """A version's parameters, after checking the files against the registered hashes."""
        return load_weights(self.verify(study_id, version).weights_path.read_bytes())
