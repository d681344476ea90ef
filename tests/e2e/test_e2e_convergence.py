"""Convergence end to end: four hospitals with non-IID labels, two aggregator processes,
four node processes, real Mosquitto with mutual TLS.

Each site's lesion prevalence differs (label skew 0.8: from about 16% to 82% "present").
The federation runs ROUNDS rounds of FedAvg; every node trains with DP-SGD, shares and
seals its update, and installs each jointly signed release. Then, on the same cached data
the nodes trained on:

- federated: the last release's ONNX model (ONNX Runtime), on each site's held-out split;
- centralised: one model on the union of the sites' training splits, same architecture,
  genesis, DP-SGD settings and total epochs (`node.demo.report.baselines`);
- local-only: each site alone on its own training split, scored on its own held-out split.

Federated mean held-out accuracy must be within 2 points of centralised and above the mean
local-only accuracy.

Settings, measured with `bench/convergence.py` (the same parts in one process; the runs are
in bench/RESULTS.md):

- DP-SGD is tuned for convergence, not privacy: epsilon comes to about 300. With the demo's
  per-sample clip 1.0 (noise 0.5) the federation levels off 5 to 9 points below
  centralised: clipping, label skew and several local steps together bias FedAvg (no DP:
  0.99; clip 1.0 and almost no noise: 0.92). Clip 3.0 with noise 0.4 settles it within
  about a point over 40 rounds.
- 240 images a site, half held out (96 training images after the validation split). With
  more, or less noise, each site alone gets within a point or two of the federation: the
  local-only mean then depends on one site's luck (noise 0.3: 0.948 to 0.979 on these
  data; noise 0.4: 0.938 to 0.940, the 82%-lesion site stuck at its prior).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support.e2e import LiveFederation

from node.demo.federation import FederationSpec
from node.demo.report import BaselinePlan, baselines, load_site_data, mean, score_onnx
from node.round.releases import open_model_store
from node.setup import study_preprocess
from tessera.observability.events import Event

LEADER = "agg-uni"
IMAGES = 240  # per site; half held out. Fewer than a site needs alone: see the docstring
SITES = ("site-a", "site-b", "site-c", "site-d")
ROUNDS, EPOCHS, LEARNING_RATE, BATCH, NOISE, PER_SAMPLE_CLIP = 40, 2, 0.1, 32, 0.4, 3.0
SPEC = FederationSpec(
    sites=SITES,
    federation_id="converge-fed",
    architecture="spot-cnn-v1",
    min_participants=len(SITES),
    max_rounds=ROUNDS,
    clip_norm=20.0,  # the round delta's L2 bound: above what a round moves, never binding
    epsilon=1_000.0,  # about 300 spent: a convergence measurement, not a privacy setting
    round={"collect_timeout_s": 120, "agreement_timeout_s": 60, "start_wait_s": 120,
           "pause_s": 0.2, "max_rounds": ROUNDS, "local_epochs": EPOCHS,
           "learning_rate": LEARNING_RATE, "algorithm": "fedavg",
           "weight_cap": 128},  # near the training splits (96): full fixed-point precision
    strategy={"adaptive": False},
    training={"batch_size": BATCH, "noise_multiplier": NOISE, "max_grad_norm": PER_SAMPLE_CLIP},
)  # fmt: skip
SYNTH = {"skew": 0.8, "modality": "cr", "size": 64, "lesion_contrast": 40.0,
         "lesion_scale": 2.5, "test_fraction": 0.5}  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_federated_accuracy_is_within_two_points_of_centralised_and_beats_local_only(
    tmp_path: Path,
) -> None:
    with LiveFederation(tmp_path, SPEC, images_per_site=IMAGES, synth=SYNTH) as live:
        live.start_all()
        for number in range(1, ROUNDS + 1):
            live.wait_for(LEADER, Event.MODEL_RELEASED, timeout=180, round=number)
        for site in SITES:
            live.wait_until(
                lambda s=site: live.node_versions(s)[-1:] == [ROUNDS],
                f"{site} installs v{ROUNDS}",
                timeout=60,
                watch=[site],
            )
        assert live.find(LEADER, Event.ROUND_ABORTED) == []
        live.stop_all()

        model = live.prepared.study_model()
        preprocess = study_preprocess(model)
        data = [load_site_data(s, live.state(s), preprocess) for s in SITES]
        release = open_model_store(live.state(SITES[0])).onnx_bytes(ROUNDS)
    federated = score_onnx(release, data)
    plan = BaselinePlan(
        epochs=ROUNDS * EPOCHS,
        batch_size=BATCH,
        learning_rate=LEARNING_RATE,
        noise_multiplier=NOISE,
        max_grad_norm=PER_SAMPLE_CLIP,
    )
    (tmp_path / "baselines").mkdir()
    central, local = baselines(model, data, plan, tmp_path / "baselines")

    fed, cen, loc = (mean(s, "accuracy") for s in (federated, central, local))
    figures = f"federated {fed:.3f}, centralised {cen:.3f}, local-only {loc:.3f}"
    print(figures)  # the numbers the issue asks to record (pytest -s shows them)
    assert [len(d.test_y) for d in data] == [IMAGES // 2] * len(SITES)  # all held out, labelled
    assert fed >= cen - 0.02, figures
    assert fed > loc, figures
