"""The rows of the aggregator's state store, as frozen dataclasses."""

from __future__ import annotations

import json
from dataclasses import dataclass

from aggregator.agreement import PublishedSum
from aggregator.rounds import RoundState, Stage


@dataclass(frozen=True)
class RoundRecord:
    """A round as stored: its fixed parameters and its current state."""

    study_id: str
    base_model_hash: bytes
    ring_params: bytes  # RingParams.to_bytes()
    vector_length: int
    deadline_ms: int
    algorithm: str
    state: RoundState


@dataclass(frozen=True)
class ShareRecord:
    """One received share: the seed, or the path of the file holding the full vector."""

    node_id: str
    kind: str  # "seed" or "full"
    seed: bytes | None
    path: str | None
    envelope_digest: bytes


@dataclass(frozen=True)
class ModelRecord:
    """One registered model version (the files live in `folder`)."""

    study_id: str
    version: int
    round: int
    parent_hash: bytes
    model_hash: bytes
    onnx_hash: bytes
    card_hash: bytes
    folder: str
    card_json: str
    signatures: tuple[tuple[str, bytes], ...]


@dataclass(frozen=True)
class ServerStateRecord:
    """The server optimiser state after `round`, and the algorithm chosen for the next."""

    round: int
    algorithm: str
    path: str | None


def ids_json(ids: tuple[str, ...] | None) -> str | None:
    """A participant tuple as stored (JSON), or None."""
    return None if ids is None else json.dumps(list(ids))


def safe_folder_name(study_id: str) -> str:
    """A study id as a folder name (ids are short ASCII; anything odd is hex-encoded)."""
    if study_id.replace("-", "").replace("_", "").replace(".", "").isalnum() and study_id.isascii():
        return study_id
    return study_id.encode("utf-8").hex()


def round_from_row(row: tuple) -> RoundRecord:  # type: ignore[type-arg]
    """A `SELECT * FROM rounds` row as a RoundRecord."""
    (study_id, number, stage, base, ring, length, deadline, algorithm, received, close,
     participants, version, abort, _created, _updated) = row  # fmt: skip
    state = RoundState(
        round=int(number),
        stage=Stage(stage),
        received=int(received),
        close_reason=close,
        participants=None if participants is None else tuple(json.loads(participants)),
        model_version=version,
        abort_reason=abort,
    )
    return RoundRecord(study_id, bytes(base), bytes(ring), int(length), int(deadline), algorithm,
                       state)  # fmt: skip


def model_from_row(row: tuple) -> ModelRecord:  # type: ignore[type-arg]
    """A row of Store.list_models' query as a ModelRecord."""
    signatures = tuple((who, bytes.fromhex(sig)) for who, sig in json.loads(row[9]))
    return ModelRecord(
        row[0], int(row[1]), int(row[2]), bytes(row[3]), bytes(row[4]), bytes(row[5]),
        bytes(row[6]), row[7], row[8], signatures,
    )  # fmt: skip


def published_from_row(row: tuple[int, bytes, str | None]) -> PublishedSum:
    """A partial-sum fact from (round, participant_set_hash, participants JSON or NULL)."""
    members = None if row[2] is None else tuple(json.loads(row[2]))
    return PublishedSum(int(row[0]), bytes(row[1]), members)
