"""Issue 19, point 1, with real processes: one round of the largest architecture a study may
allow (ResNet-18, as in tests/data/governance/federation-manifest.toml), over real Mosquitto
with mutual TLS.

Its release (weights and ONNX export, about 85 MiB) is larger than the 64 MiB above which
a receiver spools a transfer to `<state>/spool` instead of memory. Before the fix nothing
created that folder: every chunk of the release failed with FileNotFoundError and was
acknowledged and dropped, so the follower never registered the release and no node
installed it. Now the leader releases it, the follower registers the same version, and both
nodes install it.

Lean on purpose: two nodes, 16-pixel images, eight images each, one FedSGD step.
`round.weight_cap` is the sites' size, so that their update survives the fixed-point
encoding (issue 19, point 9)."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.e2e import LiveFederation

from node.demo.federation import FederationSpec
from node.round.releases import ModelStore
from tessera.limits import SPOOL_THRESHOLD_BYTES
from tessera.observability.events import Event

LEADER, FOLLOWER = "agg-uni", "agg-ngo"
SITES = ("site-a", "site-b")
SPEC = FederationSpec(
    sites=SITES,
    federation_id="large-fed",
    architecture="resnet18-v1",
    image_size=16,
    min_participants=2,
    round={"collect_timeout_s": 240, "agreement_timeout_s": 240, "start_wait_s": 60,
           "pause_s": 3, "max_rounds": 1, "algorithm": "fedsgd", "weight_cap": 4},
    training={"batch_size": 8, "noise_multiplier": 0.8},
)  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_resnet18_release_over_the_spool_threshold_reaches_every_member(
    tmp_path: Path,
) -> None:
    with LiveFederation(tmp_path, SPEC, images_per_site=8) as live:
        live.start_all()
        everyone = [LEADER, FOLLOWER, *SITES]
        released = live.wait_for(LEADER, Event.MODEL_RELEASED, timeout=480, round=1)
        assert released["version"] == 1
        live.wait_until(
            lambda: live.find(FOLLOWER, Event.MODEL_RELEASED, round=1),
            "the follower's registration of the release",
            120,
            watch=everyone,
        )
        for site in SITES:
            installed = live.wait_for(site, Event.RELEASE_INSTALLED, timeout=120, version=1)
            assert installed["round"] == 1
            store = ModelStore(live.state(site), SPEC.federation_id, SPEC.study_id)
            folder = store.folder(1)
            size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
            assert size > SPOOL_THRESHOLD_BYTES, f"the release is {size} bytes: not spooled"
        for member in everyone:
            assert (live.state(member) / "spool").stat().st_mode & 0o777 == 0o700
