"""Sum shares as they arrive; keep what is needed to take a node back out on disk.

Memory is one running ring vector (plus one temporary vector while a share is added or
subtracted), whatever the number of nodes. What it takes to remove a node that the agreed
set leaves out goes to the ledger (the SQLite store), not to memory:

- a seed share: the 32-byte seed; removing it re-expands the keystream and subtracts it;
- a full-length share: the vector itself, written atomically (0600) to the round's share
  folder; removing it reads the file back and subtracts it. The file is not fsynced: a
  share never outlives a crash (store.recover drops them all), so paying a disk flush per
  node would buy nothing.

`finalize(participants)` subtracts every held node outside the agreed set and returns the
partial sum over exactly that set. A second share from the same node is refused with
DuplicateShare (the first copy wins); the daemon logs it.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from aggregator.errors import DuplicateShare, ShareRejected
from aggregator.records import ShareRecord
from tessera.crypto.encoding import RingParams
from tessera.crypto.sharing import Share, ShareContext, accumulate, expand
from tessera.files import PRIVATE_MODE, atomic_write


class ShareLedger(Protocol):
    """Where an accumulator records its shares; aggregator.store.Store implements it."""

    def share_folder(self, study_id: str, round_number: int) -> Path:
        """The folder for the round's full-share files (created on demand)."""
        ...

    def record_share(self, study_id: str, round_number: int, share: ShareRecord) -> None:
        """Durably record a share; DuplicateShare if the node already has one."""
        ...

    def has_share(self, study_id: str, round_number: int, node_id: str) -> bool:
        """True when the node's share for the round is recorded."""
        ...

    def iter_shares(self, study_id: str, round_number: int) -> Iterator[ShareRecord]:
        """The round's records, streamed (memory must not grow with their number)."""
        ...


class ShareAccumulator:
    """The running sum of one round's shares at one aggregator."""

    def __init__(
        self,
        *,
        federation_id: str,
        study_id: str,
        round_number: int,
        aggregator_index: int,
        params: RingParams,
        length: int,
        ledger: ShareLedger,
    ) -> None:
        if length < 1:
            raise ValueError(f"vector length is {length}; a round sums at least one element")
        self.federation_id = federation_id
        self.study_id = study_id
        self.round_number = round_number
        self.aggregator_index = aggregator_index
        self.params = params
        self.length = length
        self._ledger = ledger
        self._sum = np.zeros(length, dtype=params.dtype)
        self._count = 0
        self._finalized = False

    @property
    def count(self) -> int:
        """Shares added (duplicates excluded)."""
        return self._count

    def _context(self, node_id: str) -> ShareContext:
        return ShareContext(self.federation_id, self.study_id, self.round_number, node_id)

    def add(self, node_id: str, share: Share, envelope_digest: bytes) -> None:
        """Add one verified, opened share to the running sum.

        Raises DuplicateShare for a second share from `node_id` (nothing changes), and
        ShareRejected for a share meant for another aggregator, of the wrong length, or
        arriving after finalize. The ledger row is committed before the sum changes.
        """
        if self._finalized:
            raise ShareRejected(
                f"round {self.round_number}: share from {node_id!r} arrived after the partial "
                "sum was finalised; it is dropped"
            )
        if share.aggregator_index != self.aggregator_index:
            raise ShareRejected(
                f"share from {node_id!r} is for aggregator index {share.aggregator_index}, "
                f"this aggregator is {self.aggregator_index}; check the roster order"
            )
        if share.vector is not None and share.vector.shape != (self.length,):
            raise ShareRejected(
                f"full share from {node_id!r} has {share.vector.size} elements, the round's "
                f"vector has {self.length}; the node uses another model layout"
            )
        if share.vector is not None and share.vector.dtype != self.params.dtype:
            raise ShareRejected(
                f"full share from {node_id!r} is {share.vector.dtype}, the ring is "
                f"{self.params.dtype}; the node uses other ring parameters"
            )
        if self._ledger.has_share(self.study_id, self.round_number, node_id):
            raise DuplicateShare(self.round_number, node_id)
        record = self._persist(node_id, share, envelope_digest)
        try:
            self._ledger.record_share(self.study_id, self.round_number, record)
        except DuplicateShare:
            if record.path is not None:
                Path(record.path).unlink(missing_ok=True)
            raise
        accumulate(self._sum, share, self._context(node_id), self.params)
        self._count += 1

    def _persist(self, node_id: str, share: Share, envelope_digest: bytes) -> ShareRecord:
        """The ledger record; a full vector is first written to its own file."""
        if share.seed is not None:
            return ShareRecord(node_id, "seed", share.seed, None, envelope_digest)
        assert share.vector is not None
        folder = self._ledger.share_folder(self.study_id, self.round_number)
        # Hashed node id (no odd characters in file names) plus a random suffix, so that a
        # racing duplicate can never overwrite the first copy's file.
        name = hashlib.sha256(node_id.encode("utf-8")).hexdigest()[:32]
        path = folder / f"{name}.{secrets.token_hex(4)}.share"
        little = np.ascontiguousarray(share.vector, dtype=self.params.dtype.newbyteorder("<"))
        _write_share_file(path, little)
        return ShareRecord(node_id, "full", None, os.fspath(path), envelope_digest)

    def _vector_of(self, record: ShareRecord) -> np.ndarray:
        """Re-create a recorded share's ring vector from its seed or its file."""
        if record.kind == "seed":
            assert record.seed is not None
            share = Share(self.aggregator_index, record.seed, None)
            return expand(share, self._context(record.node_id), self.length, self.params)
        assert record.path is not None
        stored = np.fromfile(record.path, dtype=self.params.dtype.newbyteorder("<"))
        if stored.size != self.length:
            raise ShareRejected(
                f"share file of node {record.node_id!r} holds {stored.size} elements, "
                f"expected {self.length}; the share folder was tampered with"
            )
        return stored.astype(self.params.dtype, copy=False)

    def finalize(self, participants: Collection[str]) -> np.ndarray:
        """The partial sum over exactly `participants`: subtract every other held node.

        Every participant must be held (agreement.check_partial_sum_request guarantees it);
        ShareRejected otherwise, with the sum untouched. Call at most once.
        """
        if self._finalized:
            raise ShareRejected(f"round {self.round_number}: the partial sum is already final")
        wanted = set(participants)
        held = sum(
            1 for r in self._ledger.iter_shares(self.study_id, self.round_number)
            if r.node_id in wanted
        )  # fmt: skip
        if held != len(wanted):
            raise ShareRejected(
                f"round {self.round_number}: {len(wanted) - held} participant(s) have no share "
                "here; check the set with agreement.check_partial_sum_request first"
            )
        for record in self._ledger.iter_shares(self.study_id, self.round_number):
            if record.node_id not in wanted:
                # Unsigned numpy subtraction wraps modulo 2**bits: the ring inverse of add.
                np.subtract(self._sum, self._vector_of(record), out=self._sum)
        self._finalized = True
        result = self._sum
        result.flags.writeable = False
        return result


def _write_share_file(path: Path, vector: np.ndarray) -> None:
    """Write `vector`'s bytes to `path` atomically, mode 0600 from the first byte, without an
    fsync (see the module docstring)."""
    atomic_write(path, vector.data.cast("B"), mode=PRIVATE_MODE, durable=False)
