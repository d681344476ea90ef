"""The demo's closing summary when a federation released nothing (issue 19, point 10: it
printed `nan / nan` for the federated column and `nanx` for the wire)."""

from __future__ import annotations

import math

from node.demo.report import RunRecord, Score
from node.demo.summary import score_lines

SIZES = {"site-a": 12, "site-b": 9}
CENTRAL = {"site-a": Score(0.75, 0.8), "site-b": Score(0.5, math.nan)}  # one class: no AUC
LOCAL = {"site-a": Score(0.5, 0.6), "site-b": Score(0.6, 0.7)}


def test_no_release_is_said_in_a_sentence_not_as_nan() -> None:
    aborted = RunRecord(aborts=[{"round": 1, "reason": "only 1 node(s) reached every aggregator"}])
    text = "\n".join(score_lines(SIZES, {}, CENTRAL, LOCAL, aborted))
    assert "nan" not in text.lower()
    assert "No model was released: 1 round(s) aborted (only 1 node(s) reached" in text
    assert "Bytes on the wire (node uploads): none, no node sent a share" in text
    assert "0.750 / 0.800" in text and "0.500 / -" in text  # measured figures stay
    text = "\n".join(score_lines(SIZES, {}, CENTRAL, LOCAL, RunRecord()))
    assert "No model was released: no round ended in time" in text and "nan" not in text


def test_a_release_gives_the_table_and_the_ratio() -> None:
    final = {"site-a": Score(0.9, 0.95), "site-b": Score(0.8, 0.85)}
    record = RunRecord(bytes_sent=300, plaintext_bytes=100)
    lines = score_lines(SIZES, final, CENTRAL, LOCAL, record)
    assert "No model was released" not in "\n".join(lines)
    mean_row = next(line for line in lines if line.strip().startswith("mean"))
    assert mean_row.split()[1:4] == ["0.850", "/", "0.900"]
    assert lines[-1].endswith("= 3.00x (one share per aggregator)")
