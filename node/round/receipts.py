"""Whether each aggregator counted this node's share (issue 19, point 8): the node's side of
the aggregators' receipts.

When an aggregator closes collection it publishes a signed `ReceiptSet`: the commitments of
the statements it holds, without node ids. A node that joined the round finds the
commitment of its own statement there (its `round-joined` audit entry names it), or learns
that this aggregator closed the round without its share: lost by the broker, or sent after
collection closed. The broker acknowledging a publish says nothing about the aggregator
having it; this does. Such a share is left out of the round, although the epsilon of the
round was charged.

`ReceiptBook` keeps receipts that arrive before the node has answered their round (a slow
node may still be training when an aggregator closes at its deadline) and judges them once
it has. Its only state on disk is the audit log it reads; it is used from two threads
(receipts arrive on the MQTT dispatch thread, joins on the round worker), hence the lock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from tessera.governance.audit import read_entries
from tessera.wire.messages import ReceiptSet

KEEP_ROUNDS = 8  # rounds whose early receipts are kept while the node has not answered


@dataclass(frozen=True)
class ShareReceipt:
    """One aggregator's answer for one round this node joined."""

    round: int
    aggregator: str
    received: bool
    held: int  # how many shares that aggregator holds in all


class ReceiptBook:
    """Judges each aggregator's receipts against the commitment this node sent."""

    def __init__(self, audit_path: Path, federation_id: str, study_id: str) -> None:
        self.audit_path = audit_path
        self.federation_id, self.study_id = federation_id, study_id
        self._pending: dict[int, dict[str, ReceiptSet]] = {}
        self._lock = threading.Lock()

    def on_receipt(self, receipts: ReceiptSet) -> list[ShareReceipt]:
        """Judge `receipts` (signature already verified) if this node has answered its
        round; keep it for `on_joined` otherwise. Receipts of another study, of a round this
        node refused, or a repeat of one already judged, give nothing."""
        if (receipts.federation_id, receipts.study_id) != (self.federation_id, self.study_id):
            return []
        with self._lock:
            answered, judged = self._answers(receipts.round)
            if receipts.aggregator_id in judged:
                return []
            if answered is None:
                rounds = self._pending.setdefault(receipts.round, {})
                rounds.setdefault(receipts.aggregator_id, receipts)
                for stale in sorted(self._pending)[:-KEEP_ROUNDS]:
                    del self._pending[stale]
                return []
            return self._judge([receipts], answered)

    def on_joined(self, round_number: int) -> list[ShareReceipt]:
        """Judge the receipts of `round_number` that arrived before this node joined it."""
        with self._lock:
            waiting = self._pending.pop(round_number, {})
            answered, judged = self._answers(round_number)
            if answered is None:
                return []
            fresh = [r for a, r in sorted(waiting.items()) if a not in judged]
            return self._judge(fresh, answered)

    @staticmethod
    def _judge(receipts: list[ReceiptSet], commitment: bytes) -> list[ShareReceipt]:
        return [
            ShareReceipt(r.round, r.aggregator_id, r.holds(commitment), len(r.commitments))
            for r in receipts
        ]

    def _answers(self, round_number: int) -> tuple[bytes | None, set[str]]:
        """The commitment this node sent in `round_number` (None: it has not joined it, or
        joined before commitments were recorded), and the aggregators whose receipts for it
        were already judged, from the audit log."""
        commitment: bytes | None = None
        judged: set[str] = set()
        for entry in read_entries(self.audit_path):
            fields = entry.fields
            if fields.get("study_id") != self.study_id or fields.get("round") != round_number:
                continue
            if entry.kind == "round-joined" and fields.get("federation_id") == self.federation_id:
                stated = fields.get("statement")
                commitment = bytes.fromhex(stated) if isinstance(stated, str) else None
            elif entry.kind in ("share-received", "share-not-received"):
                judged.add(str(fields.get("aggregator")))
        return commitment, judged
