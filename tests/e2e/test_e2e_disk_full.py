"""Issue 19, point 5: a full disk, with real daemons over a real broker (Mosquitto, mutual
TLS) and real full file systems (a tmpfs filled until the kernel says ENOSPC).

- The leader starts on a full state folder. It used to die at start-up with a raw
  `sqlite3.OperationalError` ("disk I/O error") and crash-loop. Now it stays up, logs
  `disk-full` naming the folder, the space it needs and the space free, answers `/readyz`
  with 503 and that sentence, opens no round, and once the space is back opens and
  releases one.
- site-b's model folder is full when the release arrives. The node used to log a raw
  traceback, stay ready and lose the release for good (the message was acknowledged).
  Now it says "disk full" in its log and in `/readyz`, the broker keeps the release
  (unacknowledged), and once space returns the node installs it and is ready again.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from support.disk import small_disk
from support.e2e import LiveFederation, audit_entries

from node.demo.federation import FederationSpec
from tessera.observability.events import Event

LEADER, FOLLOWER = "agg-uni", "agg-ngo"
SPEC = FederationSpec(
    sites=("site-a", "site-b"),
    federation_id="disk-fed",
    min_participants=2,
    round={"collect_timeout_s": 60, "agreement_timeout_s": 60, "start_wait_s": 60,
           "pause_s": 3, "max_rounds": 1, "local_epochs": 1},
    training={"batch_size": 16, "noise_multiplier": 0.8},
)  # fmt: skip


def readiness(live: LiveFederation, member: str) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) of the member's /readyz."""
    started = Event.AGGREGATOR_STARTED if live.is_aggregator(member) else Event.NODE_STARTED
    port = int(live.wait_for(member, started, timeout=120)["http_port"])
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_daemons_say_disk_full_stay_up_and_resume_when_space_returns(tmp_path: Path) -> None:
    live = LiveFederation(tmp_path, SPEC)
    with ExitStack() as stack:
        leader_disk = stack.enter_context(small_disk(live.state(LEADER), size_kib=32 * 1024))
        models_disk = stack.enter_context(
            small_disk(live.state("site-b") / "models", size_kib=8 * 1024)
        )
        stack.enter_context(live)
        leader_disk.fill()
        models_disk.fill()
        live.start_all()

        # The leader: up, not ready, and saying why.
        full = live.wait_for(LEADER, Event.DISK_FULL, timeout=120)
        assert full["path"].startswith(str(live.state(LEADER))), full
        assert full["needed_bytes"] > full["free_bytes"], full
        status, body = readiness(live, LEADER)
        assert status == 503 and "disk" in body["failing"], body
        reason = body["reasons"]["disk"]
        assert reason.startswith(f"disk full: {live.state(LEADER)}") and "needs about" in reason
        assert live.running(LEADER)
        assert not live.find(LEADER, Event.ROUND_OPENED)

        leader_disk.free()
        live.wait_for(LEADER, Event.DISK_SPACE_RETURNED, timeout=60)
        live.wait_for(LEADER, Event.MODEL_RELEASED, timeout=240, round=1)
        status, body = readiness(live, LEADER)
        assert status == 200, body
        live.wait_until(
            lambda: audit_entries(live.state(LEADER), "release"), "the leader's release entry", 30
        )

        # site-b: the release did not fit; it says so, and nothing is lost.
        live.wait_for("site-a", Event.RELEASE_INSTALLED, timeout=60, version=1)
        full = live.wait_for("site-b", Event.DISK_FULL, timeout=60)
        assert full["path"].startswith(str(live.state("site-b") / "models")), full
        status, body = readiness(live, "site-b")
        assert status == 503 and body["reasons"]["disk"].startswith("disk full: "), body
        assert live.running("site-b") and live.node_versions("site-b") == []

        models_disk.free()
        live.wait_for("site-b", Event.RELEASE_INSTALLED, timeout=60, version=1)
        assert live.node_versions("site-b") == [1]
        live.wait_until(lambda: readiness(live, "site-b")[0] == 200, "site-b ready again", 30)
