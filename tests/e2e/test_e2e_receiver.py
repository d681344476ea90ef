"""A running node takes DICOM pushed by C-STORE (dcmtk's real `storescu`) into its dataset.

`tessera node run` with `[receiver] enabled` listens for C-STORE beside its (read-only)
DICOM folder; what a PACS pushes lands in `<state>/received`, owner-only and named by the
keyed instance hash, and the next intake pass adds it to the preprocessed cache that rounds
train on, then deletes the original. A calling AE title outside the allowed list is
refused. The node runs at log level DEBUG, and its log names no UID of the pushed object.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from support.e2e import LiveFederation

from node.demo.federation import FederationSpec
from node.intake.cache import CachedDataset
from node.intake.phi import instance_key, load_or_create_site_secret
from node.setup import study_preprocess
from tessera.observability.events import Event
from tests.support.dicom_net import storescu

SITE = "site-a"
SPEC = FederationSpec(sites=("site-a", "site-b"), federation_id="receiver-fed")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_running_node_ingests_what_a_pacs_pushes(tmp_path: Path) -> None:
    with LiveFederation(tmp_path, SPEC, images_per_site=20) as live:
        live.start(
            SITE,
            TESSERA_RECEIVER_ENABLED="true",
            TESSERA_RECEIVER_HOST="127.0.0.1",
            TESSERA_RECEIVER_PORT="0",
            TESSERA_RECEIVER_ALLOWED_CALLING_AETS="PACS1",
            TESSERA_INTAKE_INTERVAL_S="1",
            TESSERA_LOG_LEVEL="DEBUG",
        )
        listening = live.wait_for(SITE, Event.RECEIVER_LISTENING, timeout=60)
        first = live.wait_for(SITE, Event.INTAKE, timeout=60)
        assert first["ingested"] == 20
        pushed = next((live.root / "synth" / "site-01" / "dicom").rglob("*.dcm"))
        result = storescu(int(listening["port"]), pushed)
        assert result.returncode == 0, result.stderr

        state = live.state(SITE)
        secret = load_or_create_site_secret(state)
        pushed_ds = pydicom.dcmread(pushed, stop_before_pixels=True)
        key = instance_key(str(pushed_ds.SOPInstanceUID), secret)
        live.wait_for(SITE, Event.RECEIVER_STORED, instance=key, timeout=30)
        live.wait_until(
            lambda: any(e["ingested"] == 1 for e in live.find(SITE, Event.INTAKE)),
            "the pushed object ingested",
            timeout=60,
            watch=[SITE],
        )
        dataset = CachedDataset(state, study_preprocess(live.prepared.study_model()))
        assert key in dataset.keys and len(dataset.keys) == 21
        live.wait_until(
            lambda: not (state / "received" / f"{key}.dcm").exists(),
            "the cached original deleted",
            timeout=60,
            watch=[SITE],
        )

        refused = storescu(int(listening["port"]), pushed, calling="OTHER")
        assert "Association Rejected" in refused.stderr, refused.stderr
    log = "\n".join(p.read_text() for p in live.runs[SITE])
    uids = (pushed_ds.SOPInstanceUID, pushed_ds.StudyInstanceUID, pushed_ds.SeriesInstanceUID)
    assert not any(str(uid) in log for uid in uids)
