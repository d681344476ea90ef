"""A node's side of the aggregators' receipts (issue 19, point 8): each ReceiptSet judged
against the commitment of the statement this node sent, whenever it arrives."""

from __future__ import annotations

from pathlib import Path

from node.round.receipts import ReceiptBook, ShareReceipt
from tessera.governance.audit import AuditLog
from tessera.wire.messages import ReceiptSet
from tessera.wire.statement import NodeStatement

FED, STUDY = "fed-1", "study-1"
MINE = NodeStatement.fresh(1.5).commitment()
OTHERS = tuple(NodeStatement.fresh(1.5).commitment() for _ in range(2))


def joined(audit: AuditLog, round_number: int, commitment: bytes = MINE) -> None:
    """The entry `participate` writes once this node has sent its shares."""
    audit.append("round-joined", {
        "federation_id": FED, "study_id": STUDY, "round": round_number,
        "round_open": "00" * 32, "aggregators": 2, "samples": 10, "clipped": False,
        "statement": commitment.hex(),
    })  # fmt: skip


def receipts(aggregator: str, *held: bytes, round_number: int = 1) -> ReceiptSet:
    return ReceiptSet(FED, STUDY, round_number, aggregator, held)


def book(tmp_path: Path) -> tuple[ReceiptBook, AuditLog]:
    audit = AuditLog.open(tmp_path / "audit.log")
    return ReceiptBook(audit.path, FED, STUDY), audit


def test_a_receipt_with_this_nodes_commitment_confirms_and_one_without_says_so(
    tmp_path: Path,
) -> None:
    receipt_book, audit = book(tmp_path)
    joined(audit, 1)
    assert receipt_book.on_receipt(receipts("agg-1", MINE, *OTHERS)) == [
        ShareReceipt(1, "agg-1", received=True, held=3)
    ]
    assert receipt_book.on_receipt(receipts("agg-2", *OTHERS)) == [
        ShareReceipt(1, "agg-2", received=False, held=2)
    ]


def test_receipts_that_arrive_while_the_node_still_trains_are_judged_once_it_joins(
    tmp_path: Path,
) -> None:
    # The aggregators closed at their deadline before this node's shares went out.
    receipt_book, audit = book(tmp_path)
    assert receipt_book.on_receipt(receipts("agg-1", *OTHERS)) == []
    assert receipt_book.on_receipt(receipts("agg-2", *OTHERS)) == []
    joined(audit, 1)
    verdicts = receipt_book.on_joined(1)
    assert [(v.aggregator, v.received) for v in verdicts] == [("agg-1", False), ("agg-2", False)]
    assert receipt_book.on_joined(1) == []  # judged once


def test_a_round_this_node_did_not_join_or_another_study_gives_nothing(tmp_path: Path) -> None:
    receipt_book, audit = book(tmp_path)
    audit.append("round-refused", {
        "federation_id": FED, "study_id": STUDY, "round": 1, "round_open": "00" * 32,
        "reason": "paused", "detail": "",
    })  # fmt: skip
    assert receipt_book.on_receipt(receipts("agg-1", *OTHERS)) == []
    assert receipt_book.on_joined(1) == []
    joined(audit, 2)
    other = ReceiptSet(FED, "other-study", 2, "agg-1", OTHERS)
    assert receipt_book.on_receipt(other) == []


def test_a_receipt_already_recorded_is_not_judged_again_after_a_restart(tmp_path: Path) -> None:
    receipt_book, audit = book(tmp_path)
    joined(audit, 1)
    (verdict,) = receipt_book.on_receipt(receipts("agg-2", *OTHERS))
    audit.append("share-not-received", {
        "study_id": STUDY, "round": 1, "aggregator": "agg-2", "held": verdict.held,
    })  # fmt: skip
    restarted = ReceiptBook(audit.path, FED, STUDY)  # the node restarted; redelivered
    assert restarted.on_receipt(receipts("agg-2", *OTHERS)) == []
