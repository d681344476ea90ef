"""Step 8 at the node: accept jointly signed model releases into a local model store.

`accept_release(release_bytes, aggregator_keys, store)` trusts a release only when every
aggregator of the federation signed its header and the payload matches the header's three
hashes (`tessera.wire.release.verify_release`), the release is for the store's federation and
study, and the ONNX export names these very weights in its metadata. Only then are the
weights, the ONNX file, the model card and the signed release written, each atomically, to
`<state>/models/<version>/`, and the version recorded. Every refusal raises and is audited
(kind `release`, outcome `refused`); nothing of a refused release reaches the disk. A release
that does not fit raises DiskFull (naming the models folder and what the release needs) and
leaves nothing of itself behind: it is not refused, only not yet installed.

Which model inference uses: `current()` is the pinned version if one is pinned, else the
newest. `rollback()` pins the version before the current one; `pin(v)` and `unpin()` are the
operator's. The store's state (`models/state.json`) is JSON written atomically (temp file,
fsync, os.replace), after the version's files, so a killed process leaves either the old
state or the new one with all files in place; a folder without a record is overwritten by
the next acceptance of that version. Readers re-check a stored file's hash (`onnx_bytes`,
`weights_bytes`) so a damaged disk copy is never served or trained from: they raise
ModelFileDamaged. A damaged version is repaired, never replaced: accepting its release
again (its own `release.bin` when that still verifies, `repair_from_disk`; or a copy the
aggregators send, `node.daemon`) rewrites exactly the files whose hashes differ.

The wire form is the bare `ModelRelease` (its authority is the joint signatures), or the same
release inside a signed envelope from any aggregator.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from node.errors import NodeError
from tessera.errors import AuthenticationError, CodecError, DiskFull
from tessera.files import atomic_write, free_bytes
from tessera.governance.audit import AuditLog
from tessera.limits import MAX_RELEASE_PAYLOAD_BYTES
from tessera.models.onnx_export import read_metadata
from tessera.wire.envelopes import ENVELOPE_MAGIC, open_envelope_as
from tessera.wire.ids import check_id
from tessera.wire.release import (
    CARD_FILE,
    ONNX_FILE,
    RELEASE_FILE,
    WEIGHTS_FILE,
    ModelRelease,
    ReleaseBundle,
    verify_release,
)

STATE_FILE = "state.json"
_FORMAT = 1


class ModelFileDamaged(NodeError):
    """A stored file of an accepted version is missing or fails its release hash."""

    def __init__(self, version: int, path: Path, problem: str) -> None:
        super().__init__(
            f"model version {version}: {path} {problem}; the disk copy is damaged: the node "
            "serves and trains from the newest intact version and re-fetches this one from "
            f"the aggregators (or restore {path.parent} from backup)"
        )
        self.version = version


class ReleaseRefused(NodeError):
    """A release this node will not install; `reason` says which check failed."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"release refused ({reason}): {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class StoredModel:
    """One accepted release as the store records it (hashes in hex)."""

    version: int
    round: int
    parent_hash: str
    model_hash: str
    onnx_hash: str
    card_hash: str
    signers: tuple[str, ...]


class ModelStore:
    """The accepted models of one study at this node, under `<state_dir>/models/`."""

    def __init__(
        self, state_dir: Path, federation_id: str, study_id: str, audit: AuditLog | None = None
    ) -> None:
        self.root = Path(state_dir) / "models"
        self.federation_id = check_id("federation id", federation_id)
        self.study_id = check_id("study id", study_id)
        self.audit = audit
        self.root.mkdir(parents=True, exist_ok=True)
        self._models: dict[int, StoredModel] = {}
        self._pinned: int | None = None
        self._load()

    @property
    def state_path(self) -> Path:
        return self.root / STATE_FILE

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the store's lock and re-read its state: the running daemon and the operator's
        `tessera node models pin` may both change it, and neither may undo the other."""
        with open(self.root / ".lock", "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            self._load()
            yield

    def reload(self) -> bool:
        """Re-read the state another process may have changed; True if what `current()`
        answers changed."""
        before = self.current()
        with self._locked():
            pass
        return self.current() != before

    def _load(self) -> None:
        if not self.state_path.exists():
            return
        try:
            data = json.loads(self.state_path.read_text(encoding="utf-8"))
            if data.get("format") != _FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            models = [StoredModel(**{**m, "signers": tuple(m["signers"])}) for m in data["models"]]
            pinned = data["pinned"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise NodeError(
                f"model store state {self.state_path} is unreadable ({error}); restore it from "
                "backup, or move the models folder aside and let the next release refill it"
            ) from None
        if (data.get("federation_id"), data.get("study_id")) != (self.federation_id, self.study_id):
            raise NodeError(
                f"model store {self.root} belongs to federation {data.get('federation_id')!r} "
                f"study {data.get('study_id')!r}, not {self.federation_id!r} {self.study_id!r}; "
                "give each study its own state folder"
            )
        self._models = {m.version: m for m in models}
        self._pinned = pinned if pinned in self._models else None

    def _save(self) -> None:
        document = {
            "format": _FORMAT,
            "federation_id": self.federation_id,
            "study_id": self.study_id,
            "models": [asdict(self._models[v]) for v in sorted(self._models)],
            "pinned": self._pinned,
        }
        atomic_write(self.state_path, json.dumps(document, indent=1).encode("utf-8"))

    def _audit(self, fields: Mapping[str, Any]) -> None:
        if self.audit is not None:
            self.audit.append("release", {"study_id": self.study_id, **fields})

    def versions(self) -> list[StoredModel]:
        """Every accepted version, oldest first."""
        return [self._models[v] for v in sorted(self._models)]

    def get(self, version: int) -> StoredModel | None:
        """The record of `version`, or None if it was never accepted."""
        return self._models.get(version)

    @property
    def pinned(self) -> int | None:
        """The pinned version, or None when inference follows the newest release."""
        return self._pinned

    def current(self) -> int | None:
        """The version inference should use: the pinned one, else the newest; None if empty."""
        if self._pinned is not None:
            return self._pinned
        return max(self._models) if self._models else None

    def folder(self, version: int) -> Path:
        """Where `version`'s files live."""
        return self.root / str(version)

    def onnx_bytes(self, version: int) -> bytes:
        """The stored ONNX export of `version`, re-checked against its accepted hash;
        ModelFileDamaged if it is missing or differs."""
        return self._checked(version, ONNX_FILE, self._require(version).onnx_hash)

    def weights_bytes(self, version: int) -> bytes:
        """The stored weights (safetensors) of `version`, re-checked against the release's
        model hash; ModelFileDamaged if they are missing or differ."""
        return self._checked(version, WEIGHTS_FILE, self._require(version).model_hash)

    def damaged(self, version: int) -> ModelFileDamaged | None:
        """The first of `version`'s weights, ONNX and card that is damaged, else None."""
        record = self._require(version)
        files = ((WEIGHTS_FILE, record.model_hash), (ONNX_FILE, record.onnx_hash),
                 (CARD_FILE, record.card_hash))  # fmt: skip
        for name, expected in files:
            try:
                self._checked(version, name, expected)
            except ModelFileDamaged as error:
                return error
        return None

    def _checked(self, version: int, name: str, expected: str) -> bytes:
        path = self.folder(version) / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ModelFileDamaged(version, path, "is missing") from None
        if not hmac.compare_digest(hashlib.sha256(data).hexdigest(), expected):
            raise ModelFileDamaged(version, path, "does not match its release hash")
        return data

    def repair_from_disk(
        self, version: int, aggregator_keys: Mapping[str, Ed25519PublicKey]
    ) -> bool:
        """Rewrite `version`'s damaged files from its own stored `release.bin`, if that still
        verifies (every aggregator's signature, every hash); False when it does not."""
        try:
            data = (self.folder(version) / RELEASE_FILE).read_bytes()
            record = _accept(data, aggregator_keys, self, MAX_RELEASE_PAYLOAD_BYTES)
        except (OSError, AuthenticationError, ReleaseRefused, CodecError):
            return False
        return record.version == version and self.damaged(version) is None

    def _restore(self, release: ModelRelease, bundle: ReleaseBundle) -> list[str]:
        """Rewrite the files of an accepted version that no longer match; their names."""
        folder = self.folder(release.version)
        folder.mkdir(parents=True, exist_ok=True)
        rewritten = []
        files = ((WEIGHTS_FILE, bundle.weights), (ONNX_FILE, bundle.onnx),
                 (CARD_FILE, bundle.card), (RELEASE_FILE, release.to_bytes()))  # fmt: skip
        for name, data in files:
            path = folder / name
            try:
                intact = hmac.compare_digest(
                    hashlib.sha256(path.read_bytes()).digest(), hashlib.sha256(data).digest()
                )
            except FileNotFoundError:
                intact = False
            if not intact:
                atomic_write(path, data)
                rewritten.append(name)
        if rewritten:
            self._audit({"outcome": "repaired", "version": release.version,
                         "files": len(rewritten)})  # fmt: skip
        return rewritten

    def pin(self, version: int) -> None:
        """Serve `version` until unpinned, whatever newer releases arrive."""
        with self._locked():
            self._require(version)
            self._pinned = version
            self._save()
        self._audit({"outcome": "pinned", "version": version})

    def unpin(self) -> None:
        """Follow the newest release again."""
        with self._locked():
            self._pinned = None
            self._save()
        self._audit({"outcome": "unpinned", "version": self.current()})

    def rollback(self) -> int:
        """Pin the version before the current one, and return it."""
        with self._locked():
            current = self.current()
            older = [v for v in self._models if current is not None and v < current]
            if not older:
                raise NodeError(
                    f"no version before {current} to roll back to; accepted: {sorted(self._models)}"
                )
            target = max(older)
            self._pinned = target
            self._save()
        self._audit({"outcome": "rolled-back", "version": target, "from_version": current})
        return target

    def _require(self, version: int) -> StoredModel:
        record = self._models.get(version)
        if record is None:
            raise NodeError(
                f"version {version} is not in the model store; accepted: {sorted(self._models)}"
            )
        return record

    def _install(
        self, release: ModelRelease, weights: bytes, onnx: bytes, card: bytes
    ) -> StoredModel:
        folder = self.folder(release.version)
        files = ((WEIGHTS_FILE, weights), (ONNX_FILE, onnx), (CARD_FILE, card),
                 (RELEASE_FILE, release.to_bytes()))  # fmt: skip
        record = _record(release)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for name, data in files:
                atomic_write(folder / name, data)
            with self._locked():
                self._models[release.version] = record
                self._save()  # last: the record exists only once every file is in place
        except DiskFull:
            # Give back what the version took, and say what all of it needs: the release
            # is taken again once the space is back (node.daemon defers its delivery).
            if release.version not in self._models:
                shutil.rmtree(folder, ignore_errors=True)
            needed = sum(len(data) for _, data in files)
            raise DiskFull(str(self.root), needed, free_bytes(self.root)) from None
        return record


def open_model_store(state_dir: Path, audit: AuditLog | None = None) -> ModelStore:
    """The model store already in `state_dir` (its federation and study read from it);
    NodeError when this node has accepted no release yet."""
    path = Path(state_dir) / "models" / STATE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        federation_id, study_id = data["federation_id"], data["study_id"]
    except FileNotFoundError:
        raise NodeError(
            f"{path} does not exist: this node has accepted no release yet (check --state)"
        ) from None
    except (ValueError, KeyError, TypeError) as error:
        raise NodeError(f"model store state {path} is unreadable ({error})") from None
    return ModelStore(Path(state_dir), federation_id, study_id, audit)


def _record(release: ModelRelease) -> StoredModel:
    return StoredModel(
        release.version, release.round, release.parent_hash.hex(), release.model_hash.hex(),
        release.onnx_hash.hex(), release.card_hash.hex(),
        tuple(sorted(signer for signer, _ in release.signatures)),
    )  # fmt: skip


def parse_release(
    data: bytes, aggregator_keys: Mapping[str, Ed25519PublicKey], max_size: int
) -> ModelRelease:
    """A ModelRelease from its wire bytes: bare, or in an envelope signed by an aggregator."""
    if data[: len(ENVELOPE_MAGIC)] == ENVELOPE_MAGIC:
        return open_envelope_as(data, ModelRelease, aggregator_keys, max_size).message
    return ModelRelease.from_bytes(data, max_size)


def accept_release(
    release_bytes: bytes,
    aggregator_keys: Mapping[str, Ed25519PublicKey],
    store: ModelStore,
    max_payload: int = MAX_RELEASE_PAYLOAD_BYTES,
) -> StoredModel:
    """Verify a release and install it in `store`; return its record.

    `aggregator_keys` must be every aggregator's key from the roster or manifest. Raises
    AuthenticationError (vague) unless all of them, and no one else, signed and the payload
    matches the hashes; ReleaseRefused for a malformed release, another federation or study,
    an ONNX export that names other weights, or a version already accepted with other
    contents. Each refusal is audited. Accepting the same release again rewrites any of its
    files that are damaged on disk (audited as `repaired`), and is otherwise a no-op.
    """
    try:
        return _accept(release_bytes, aggregator_keys, store, max_payload)
    except AuthenticationError as error:
        store._audit({"outcome": "refused", "reason": "not-verified", "detail": str(error)})
        raise
    except ReleaseRefused as refused:
        store._audit({"outcome": "refused", "reason": refused.reason, "detail": refused.detail})
        raise


def _accept(
    data: bytes,
    aggregator_keys: Mapping[str, Ed25519PublicKey],
    store: ModelStore,
    max_payload: int,
) -> StoredModel:
    try:
        release = parse_release(data, aggregator_keys, max_payload)
    except CodecError as error:
        raise ReleaseRefused("malformed", str(error)) from None
    if (release.federation_id, release.study_id) != (store.federation_id, store.study_id):
        raise ReleaseRefused(
            "wrong-study",
            f"release is for {release.federation_id!r} study {release.study_id!r}; this store "
            f"holds {store.federation_id!r} study {store.study_id!r}",
        )
    bundle = verify_release(release, aggregator_keys)
    try:
        named = read_metadata(bundle.onnx).model_hash
    except Exception as error:  # noqa: BLE001 - protobuf and JSON raise varied types
        raise ReleaseRefused("onnx-unreadable", f"{type(error).__name__}: {error}") from None
    if not hmac.compare_digest(named, release.model_hash.hex()):
        raise ReleaseRefused(
            "onnx-not-of-these-weights",
            f"the ONNX export names weights {named[:16]}..., the release "
            f"{release.model_hash.hex()[:16]}...; the aggregators must re-export",
        )
    existing = store.get(release.version)
    if existing is not None:
        if existing == _record(release):
            store._restore(release, bundle)  # a damaged disk copy is rewritten, else a no-op
            return existing  # the retained release again, e.g. after a reconnect
        raise ReleaseRefused(
            "version-conflict",
            f"version {release.version} was already accepted with other contents "
            f"(model {existing.model_hash[:16]}...); versions are never replaced",
        )
    record = store._install(release, bundle.weights, bundle.onnx, bundle.card)
    store._audit({"outcome": "accepted", "version": release.version, "round": release.round,
                  "model_hash": record.model_hash})  # fmt: skip
    return record
