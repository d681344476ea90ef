"""The rows of the aggregator's state store, as frozen dataclasses."""

from __future__ import annotations

from dataclasses import dataclass

from aggregator.rounds import RoundState


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
