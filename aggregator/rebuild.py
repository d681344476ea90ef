"""`tessera aggregator rebuild-state`: rebuild a lost or empty state store from the model
registry and the audit log (issue 19, point 3; why a lost store must not start empty:
aggregator.state_history).

What the store must know to continue the federation, and where it comes from:

- every released **version** (hashes, lineage, card, signatures): each registry folder's
  `release.bin`, verified again with every aggregator's key from the verified roster, so an
  altered registry is refused, never trusted. Versions must run 1..N, each the child of the
  one before, and every release the audit log records must be among them (same round, same
  model hash). A weights, ONNX or card file that differs from its signed release is written
  again from it (and reported);
- the **optimiser state** after the newest version: its `server_state.safetensors` (not
  signed: it is kept as found, and must parse), with the next round's algorithm from the
  signed card;
- the **rounds**: every round number the audit log or a release names, so the next round is
  newer than any a node has answered; each is finished (released, or aborted with the
  logged reason), on the base model it was opened on (the newest version released before
  it, or the genesis model);
- the **partial-sum facts**: every `participant-set` entry (the daemon appends it before the
  partial sum leaves the process), so the retry rule still holds on a base model summed
  without a release. A log written before that ordering (and before a round that aborted
  in the same step as its sum was logged) may lack such an entry; nothing can recover it.

The audit log's chain is verified first (and its anchor, where given). The rebuild writes
one store transaction into an empty store, and appends a `state-rebuilt` audit entry.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from aggregator.config import AggregatorConfig
from aggregator.errors import StoreError
from aggregator.model_card import card_from_bytes
from aggregator.records import ModelRecord, RoundRecord, ServerStateRecord
from aggregator.registry import GENESIS_PARENT, SERVER_STATE_FILE, relative_folder
from aggregator.round_context import BaseModel
from aggregator.rounds import RoundState, Stage
from aggregator.setup import StudySetup
from aggregator.state_history import (
    AuditHistory,
    read_audit_history,
    registry_versions,
    store_is_blank,
)
from aggregator.store import Store
from aggregator.strategies import server_state_from_bytes
from tessera.errors import TesseraError
from tessera.files import PRIVATE_MODE, atomic_write
from tessera.governance.audit import Anchor, AuditLog
from tessera.wire.messages import ModelRelease, ParticipantSet
from tessera.wire.release import (
    CARD_FILE,
    ONNX_FILE,
    RELEASE_FILE,
    WEIGHTS_FILE,
    ReleaseBundle,
    verify_release,
)

ABORTED_UNLOGGED = "rebuilt from the audit log: the round ended without a release"


@dataclass(frozen=True)
class Verified:
    """One registry version, its release verified against every aggregator's key."""

    release: ModelRelease
    bundle: ReleaseBundle
    card: dict[str, object]
    folder: Path


@dataclass
class RebuildReport:
    """What `rebuild_state` found and wrote: the lines the command prints."""

    database: Path
    history: AuditHistory
    versions: list[Verified]
    rounds: list[RoundRecord]
    sums: int
    anchor: Anchor | None = None  # the anchor the audit log was checked against, if any
    rewritten: list[Path] = field(default_factory=list)
    moved_aside: list[Path] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The summary, one fact a line."""
        last = self.history.anchor.to_text() if self.history.anchor else "(empty)"
        released = [r.state.round for r in self.rounds if r.state.stage is Stage.RELEASED]
        latest = max((r.state.round for r in self.rounds), default=0)
        checked = (
            f"chain intact through the anchored entry {self.anchor.seq}"
            if self.anchor is not None
            else "each linked to the one before; without --anchor a log rewritten with "
            "recomputed hashes or cut off at the end cannot be ruled out"
        )
        text = [
            f"rebuilt {self.database} from models/ and the audit log "
            f"({self.history.entries} entries, {checked}; last entry {last})",
        ]
        for v in self.versions:
            signers = ", ".join(who for who, _ in v.release.signatures)
            r = v.release
            text.append(f"  version {r.version}: round {r.round}, model "
                        f"{r.model_hash.hex()[:16]}, signed by {signers} (verified)")  # fmt: skip
        text.append(f"  rounds: {len(self.rounds)} ({len(released)} released, the rest "
                    f"aborted); latest round {latest}, the next is {latest + 1}")  # fmt: skip
        text.append(f"  partial sums on record: {self.sums}")
        text += [f"  rewritten from its signed release: {path}" for path in self.rewritten]
        text += [f"  moved aside (a WAL without its database): {path}" for path in self.moved_aside]
        return text


def rebuild_state(
    config: AggregatorConfig, setup: StudySetup, anchor: Anchor | None = None
) -> RebuildReport:
    """Rebuild the store of `config` (see the module docstring); StoreError naming the fix
    when the registry or the audit log cannot be trusted or the store is not empty."""
    layout, study = config.layout, config.study_id
    if not layout.audit_log.exists():
        raise StoreError(
            f"{layout.audit_log} is missing: without it the rounds and partial sums after the "
            "newest release are unknown, and a rebuilt store could sum a base model twice. "
            "Restore the audit log from a backup, then run rebuild-state again"
        )
    history = read_audit_history(layout.audit_log, study, anchor)
    keys = {a: setup.roster.aggregator_signing[a] for a in setup.roster.aggregator_ids}
    versions = _verified_versions(layout.registry, config.federation_id, study, keys, history)
    models = _model_rows(versions, config.strategy.optimizer)
    genesis = BaseModel(setup.model.genesis(), 0, GENESIS_PARENT).weights_hash()
    rounds = _round_rows(study, history, versions, genesis)
    sums = [
        (study, s.round, _set_hash(config, setup, history, s.round, s.nodes), s.nodes)
        for s in history.summed
    ]
    report = RebuildReport(layout.database, history, versions, rounds, len(sums), anchor)
    if store_is_blank(layout.database):
        report.moved_aside = _move_orphaned_wal(layout.database)
    with Store(layout.database, layout.shares) as store:
        store.restore(rounds, sums, models)
    report.rewritten = _rewrite_from_releases(versions)
    with AuditLog.open(layout.audit_log) as audit:
        audit.append("state-rebuilt", {
            "study_id": study, "versions": len(versions),
            "latest_version": versions[-1].release.version if versions else 0,
            "latest_round": max((r.state.round for r in rounds), default=0),
            "partial_sums": len(sums), "from_entry": report.history.entries,
        })  # fmt: skip
    return report


def _verified_versions(
    registry_root: Path,
    federation_id: str,
    study: str,
    keys: Mapping[str, Ed25519PublicKey],
    history: AuditHistory,
) -> list[Verified]:
    """Every version on disk, verified and chained (the module docstring)."""
    on_disk = registry_versions(registry_root, study)
    for version, (number, model_hash) in sorted(history.released.items()):
        if version not in on_disk:
            raise StoreError(
                f"the audit log records the release of version {version} (round {number}, "
                f"model {model_hash[:16]}), but {registry_root} has no such version: restore "
                f"its folder {relative_folder(study, version)} from a backup or from another "
                "aggregator's models/, then run rebuild-state again"
            )
    verified: list[Verified] = []
    parent = GENESIS_PARENT
    for version in range(1, max(on_disk, default=0) + 1):
        folder = on_disk.get(version)
        if folder is None:
            raise StoreError(
                f"{registry_root} lacks version {version} below version {max(on_disk)}: "
                f"restore {relative_folder(study, version)} from a backup or another aggregator"
            )
        try:
            release = ModelRelease.from_bytes((folder / RELEASE_FILE).read_bytes())
            bundle = verify_release(release, keys)
            card = card_from_bytes(bundle.card)
        except (TesseraError, ValueError) as error:
            raise StoreError(
                f"{folder / RELEASE_FILE} does not verify against the roster's aggregator keys "
                f"({type(error).__name__}: {error}): the registry was altered or damaged and is "
                "not trusted. Restore that folder from a backup or another aggregator's models/"
            ) from None
        expected = (federation_id, study, version, parent)
        found = (release.federation_id, release.study_id, release.version, release.parent_hash)
        card_says = (card["study"], card["version"], card["round"])
        if found != expected or card_says != (study, version, release.round):
            raise StoreError(
                f"{folder / RELEASE_FILE} is signed but is not version {version} of study "
                f"{study} on top of version {version - 1}: restore the registry from a backup"
            )
        logged = history.released.get(version)
        if logged is not None and logged != (release.round, release.model_hash.hex()):
            raise StoreError(
                f"version {version} in {folder} is not the one the audit log records (round "
                f"{logged[0]}, model {logged[1][:16]}): restore the registry from a backup"
            )
        verified.append(Verified(release, bundle, card, folder))
        parent = release.model_hash
    return verified


def _model_rows(
    versions: list[Verified], optimizer: str
) -> list[tuple[ModelRecord, ServerStateRecord | None]]:
    """The registry's rows, with the optimiser state after the newest version."""
    rows: list[tuple[ModelRecord, ServerStateRecord | None]] = []
    for v in versions:
        r = v.release
        record = ModelRecord(r.study_id, r.version, r.round, r.parent_hash, r.model_hash,
                             r.onnx_hash, r.card_hash, relative_folder(r.study_id, r.version),
                             v.bundle.card.decode("ascii"), r.signatures)  # fmt: skip
        rows.append((record, None))
    if versions:
        newest = versions[-1]
        state_file = newest.folder / SERVER_STATE_FILE
        if state_file.is_file():
            try:
                server_state_from_bytes(state_file.read_bytes())
            except (TesseraError, ValueError) as error:
                raise StoreError(f"{state_file} is damaged ({error}); restore it from a "
                                 "backup or another aggregator") from None  # fmt: skip
            path = f"{relative_folder(newest.release.study_id, newest.release.version)}/" + (
                SERVER_STATE_FILE
            )
            state = ServerStateRecord(newest.release.round, _next_algorithm(newest.card), path)
            rows[-1] = (rows[-1][0], state)
        elif optimizer != "none":
            raise StoreError(
                f"{state_file} is missing and the server optimiser {optimizer!r} keeps state "
                "between rounds: restore it from a backup or another aggregator's models/"
            )
    return rows


def _next_algorithm(card: dict[str, object]) -> str:
    """The next round's algorithm as the signed card states it (as aggregator.catch_up)."""
    strategy = card["strategy"]
    assert isinstance(strategy, dict)
    switches = strategy["switches"]
    return str(switches[-1]["to"] if switches else strategy["algorithm"])


def _round_rows(
    study: str, history: AuditHistory, versions: list[Verified], genesis_hash: bytes
) -> list[RoundRecord]:
    """Every round the log or a release names, finished, on the base it was opened on."""
    released = {v.release.round: v.release for v in versions}
    summed = {s.round: s.nodes for s in history.summed}
    numbers = sorted({*history.opened, *history.aborted, *summed, *released})
    rows = []
    for number in numbers:
        before = [v.release for v in versions if v.release.round < number]
        base = before[-1].model_hash if before else genesis_hash
        opened = history.opened.get(number, {})
        members = summed.get(number)
        release = released.get(number)
        state = RoundState(
            round=number,
            stage=Stage.RELEASED if release else Stage.ABORTED,
            received=len(members or ()),
            participants=members,
            model_version=str(release.version) if release else None,
            abort_reason=None if release else history.aborted.get(number, ABORTED_UNLOGGED),
        )
        # The ring, vector length and deadline of a finished round are read by nothing.
        rows.append(RoundRecord(study, base, b"", 0, 0, str(opened.get("algorithm", "")), state))
    return rows


def _set_hash(
    config: AggregatorConfig,
    setup: StudySetup,
    history: AuditHistory,
    number: int,
    nodes: tuple[str, ...],
) -> bytes:
    """The hash of the ParticipantSet a logged sum answered (its leader from the log)."""
    leader = str(history.opened.get(number, {}).get("leader", setup.bundle.roster.leader))
    return ParticipantSet(config.federation_id, config.study_id, number, leader, nodes).digest()


def _move_orphaned_wal(database: Path) -> list[Path]:
    """A -wal or -shm left beside a missing or empty database belongs to the lost one:
    SQLite would replay it into the new file. Rename it aside (kept, not deleted)."""
    moved = []
    for suffix in ("-wal", "-shm"):
        leftover = Path(f"{database}{suffix}")
        if leftover.exists():
            target = Path(f"{leftover}.orphaned")
            os.replace(leftover, target)
            moved.append(target)
    return moved


def _rewrite_from_releases(versions: list[Verified]) -> list[Path]:
    """Write again each weights, ONNX or card file that differs from its signed release."""
    rewritten = []
    for v in versions:
        parts = ((WEIGHTS_FILE, v.bundle.weights), (ONNX_FILE, v.bundle.onnx),
                 (CARD_FILE, v.bundle.card))  # fmt: skip
        for name, data in parts:
            path = v.folder / name
            if not path.is_file() or path.read_bytes() != data:
                atomic_write(path, data, mode=PRIVATE_MODE)
                rewritten.append(path)
    return rewritten
