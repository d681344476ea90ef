"""A node whose privacy ledger is deleted, with real processes (Mosquitto over TLS, two
aggregators, two node daemons): the budget never goes down.

1. Round 1: both sites train with DP; site-a's ledger and audit log record the charge.
2. site-a is stopped, its ledger deleted, and started again. It must not start afresh at
   epsilon 0: it reports the gap (event, `/readyz` 503 "privacy ledger" with the fix,
   `tessera_epsilon_spent` at the audit log's figure) and refuses the next round with the
   reason `ledger-behind`, audited, sending nothing.
3. `tessera node rebuild-ledger` (a real process, beside the running node) rebuilds the
   ledger from the verified audit log; the node sees it, is ready again, and trains in the
   next round: its ledger then holds round 1 and that round, composed, and agrees with the
   audit log.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from support.e2e import REPO, LiveFederation, audit_entries, epsilon_agreement

from node.demo.federation import FederationSpec
from tessera.observability.events import Event

LEADER, FOLLOWER = "agg-uni", "agg-ngo"
VICTIM, OTHER = "site-a", "site-b"
SPEC = FederationSpec(
    sites=(VICTIM, OTHER),
    federation_id="ledger-fed",
    min_participants=2,
    round={"collect_timeout_s": 10, "agreement_timeout_s": 20, "start_wait_s": 3,
           "pause_s": 3, "max_rounds": 6, "local_epochs": 1, "weight_cap": 64},
    strategy={"adaptive": False},
    training={"batch_size": 16, "noise_multiplier": 0.8},
)  # fmt: skip
STUDY = SPEC.study_id


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _epsilon_metric(port: int) -> float:
    text = _get(port, "/metrics")[1]
    match = re.search(rf'tessera_epsilon_spent{{study="{STUDY}"}} (\S+)', text)
    assert match is not None, text
    return float(match.group(1))


def _outcome(live: LiveFederation, run: int, after: int) -> dict[str, Any] | None:
    """site-a's first answer (joined or refused) to a round after `after`, in run `run`."""
    for entry in live.events(VICTIM, run):
        if entry.get("event") in (Event.ROUND_JOINED, Event.ROUND_REFUSED):
            if int(entry["round"]) > after:
                return entry
    return None


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_deleted_ledger_refuses_rounds_until_rebuilt_and_the_budget_continues(
    tmp_path: Path,
) -> None:
    with LiveFederation(tmp_path, SPEC, images_per_site=40) as live:
        live.start_all()
        state = live.state(VICTIM)
        ledger = state / "privacy" / f"{STUDY}.json"

        # 1. site-a trains in round 1.
        live.wait_for(VICTIM, Event.ROUND_JOINED, timeout=180, round=1)
        live.stop(VICTIM)
        spent_before, audited = epsilon_agreement(state, STUDY)
        assert spent_before > 0 and audited == pytest.approx(spent_before)

        # 2. The ledger is lost; the node starts again.
        ledger.unlink()
        live.start(VICTIM)
        started = live.wait_for(VICTIM, Event.NODE_STARTED, run=1, timeout=120)
        port = int(started["http_port"])
        refused = live.wait_until(
            lambda: _outcome(live, 1, after=1), "site-a to answer round 2", 180, watch=[VICTIM]
        )
        assert refused["event"] == Event.ROUND_REFUSED, refused  # old code: joined at epsilon 0
        assert refused["reason"] == "ledger-behind"
        assert "tessera node rebuild-ledger" in refused["detail"]
        behind = live.wait_for(VICTIM, Event.LEDGER_BEHIND, run=1, timeout=30)
        assert behind["audit_epsilon"] == pytest.approx(spent_before)
        status, body = _get(port, "/readyz")
        ready = json.loads(body)
        assert status == 503 and ready["failing"] == ["privacy ledger"], body
        assert any("rebuild-ledger" in warning for warning in ready["warnings"]), body
        assert _epsilon_metric(port) == pytest.approx(spent_before)  # never 0
        assert not ledger.exists() or '"rounds": []' in ledger.read_text()
        refusals = audit_entries(state, "round-refused")
        assert refusals and refusals[-1]["reason"] == "ledger-behind"
        assert refused["round"] not in [e["round"] for e in audit_entries(state, "round-joined")]

        # 3. Rebuild from the audit log, beside the running node.
        rebuild = subprocess.run(
            [sys.executable, "-m", "tessera.cli", "node", "rebuild-ledger",
             "--config", str(live.prepared.config(VICTIM))],
            capture_output=True, text=True, timeout=120, cwd=REPO,
        )  # fmt: skip
        assert rebuild.returncode == 0, rebuild.stderr
        assert "chain intact" in rebuild.stdout and "round 1" in rebuild.stdout, rebuild.stdout
        live.wait_for(VICTIM, Event.LEDGER_RESTORED, run=1, timeout=30)
        assert _get(port, "/readyz")[0] == 200
        assert _epsilon_metric(port) == pytest.approx(spent_before)

        joined = live.wait_until(
            lambda: next(
                (e for e in live.find(VICTIM, Event.ROUND_JOINED, run=1)
                 if e["round"] > refused["round"]), None
            ),
            "site-a to train again", 240, watch=[VICTIM],
        )  # fmt: skip
        rounds = [r["round"] for r in json.loads(ledger.read_text())["rounds"]]
        assert rounds == [1, joined["round"]]
        spent_after, audited_after = epsilon_agreement(state, STUDY)
        assert spent_after > spent_before
        assert joined["epsilon_total"] == pytest.approx(spent_after)
        assert audited_after == pytest.approx(spent_after, rel=1e-9)
