"""Point-of-care inference: JSON-lines CLI, HTTP endpoint, 4xx on bad input, hot swap."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from node.errors import NodeError, UnusableImageError
from node.inference.http import InferenceServer, ServeConfig
from node.inference.runtime import LoadedModel, ModelSlot, infer_dicom_bytes, load_model
from node.intake.phi import instance_key
from node.intake.preprocess import decode_dicom_bytes
from node.synth.sites import SynthConfig, generate
from tessera.observability.events import Event
from tests.support.models import LABELS, PREPROCESS, export_model, pydicom_file, small_model

SECRET = b"k" * 32


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    files = {}
    for version, seed in (("1", 0), ("2", 1)):
        model, spec = small_model(seed)
        files[version] = export_model(model, version, spec)
    return files


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Real DICOM: pydicom's CT and MR test files and a few synthetic-hospital images."""
    root = tmp_path_factory.mktemp("synth")
    generate(SynthConfig(root, sites=2, seed=4, images_per_site=4, size=32))
    data = {name: pydicom_file(name).read_bytes() for name in ("CT_small.dcm", "MR_small.dcm")}
    for path in sorted(root.rglob("*.dcm"))[:4]:
        data[f"synth-{path.parent.name}"] = path.read_bytes()
    return data


def _post(port: int, body: bytes, path: str = "/v1/infer") -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/dicom"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_result_matches_the_model_and_names_no_patient(
    onnx_files: dict[str, bytes], inputs: dict[str, bytes]
) -> None:
    model = load_model(onnx_files["1"], threads=1)
    data = inputs["CT_small.dcm"]
    result = infer_dicom_bytes(model, data, SECRET)
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    expected = model.probabilities(decode_dicom_bytes(data, PREPROCESS)[None])[0]
    assert result["probabilities"] == {k: float(p) for k, p in zip(LABELS, expected, strict=True)}
    assert result["label"] == LABELS[int(np.argmax(expected))]
    assert result["model_version"] == "1" and len(result["model_hash"]) == 64
    assert result["instance"] == instance_key(str(ds.SOPInstanceUID), SECRET)
    text = json.dumps(result)
    for phi in (str(ds.SOPInstanceUID), str(ds.PatientName), str(ds.PatientID)):
        assert phi not in text


def test_infer_command_writes_json_lines(
    onnx_files: dict[str, bytes], inputs: dict[str, bytes], tmp_path: Path
) -> None:
    model_path = tmp_path / "model.onnx"
    model_path.write_bytes(onnx_files["2"])
    folder = tmp_path / "Doe^Jane"  # a patient-named folder must not leak into the output
    folder.mkdir()
    for name, data in inputs.items():
        (folder / name).write_bytes(data)
    (folder / "notes.txt").write_text("not an image")
    command = [sys.executable, "-m", "tessera.cli", "node", "infer", "--model", str(model_path),
               "--state", str(tmp_path / "state"), "--threads", "1", str(folder)]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr[-2000:]  # one file was unusable
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(lines) == len(inputs) + 1
    good = [line for line in lines if "error" not in line]
    bad = [line for line in lines if "error" in line]
    assert len(good) == len(inputs) and len(bad) == 1
    assert bad[0]["error"] == "not-dicom" and len(bad[0]["path_key"]) == 32
    for line in good:
        assert line["model_version"] == "2" and line["label"] in LABELS
        assert sum(line["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert len(line["instance"]) == 32
    assert len({line["instance"] for line in good}) == len(good)
    assert "Doe" not in run.stdout and "Jane" not in run.stdout


def test_http_answers_and_refuses_with_reasons(
    onnx_files: dict[str, bytes], inputs: dict[str, bytes]
) -> None:
    slot = ModelSlot()
    server = InferenceServer(slot, SECRET, ServeConfig(port=0, max_body_bytes=2_000_000))
    server.start()
    try:
        status, body = _post(server.port, inputs["MR_small.dcm"])
        assert status == 503 and body["error"] == "no-model"
        slot.swap(load_model(onnx_files["1"], threads=1))
        status, body = _post(server.port, inputs["MR_small.dcm"])
        assert status == 200
        direct = infer_dicom_bytes(slot.current(), inputs["MR_small.dcm"], SECRET)
        assert body == direct
        for bad, reason in ((b"hello, not DICOM", "not-dicom"), (b"", "not-dicom"),
                            (inputs["CT_small.dcm"][:3000], "truncated")):  # fmt: skip
            status, body = _post(server.port, bad)
            assert status == 400, body
            assert body["error"] == reason and body["detail"]
        # Refused from the header alone: the server never reads an oversized body.
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.putrequest("POST", "/v1/infer")
        conn.putheader("Content-Length", "2000001")
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 413 and json.loads(response.read())["error"] == "too-large"
        conn.close()
        status, _ = _post(server.port, inputs["MR_small.dcm"], path="/v2/other")
        assert status == 404
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", "/v1/model")
        meta = json.loads(conn.getresponse().read())
        conn.close()
        assert meta["model_version"] == "1" and meta["labels"] == list(LABELS)
    finally:
        server.shutdown()


def test_truncated_and_bad_models_are_refused(onnx_files: dict[str, bytes]) -> None:
    with pytest.raises(NodeError, match="not a Tessera ONNX model"):
        load_model(b"\x00garbage")
    model = load_model(onnx_files["1"], threads=1)
    with pytest.raises(UnusableImageError):
        infer_dicom_bytes(model, b"DICM" * 10, SECRET)


def test_hot_swap_under_concurrent_requests(
    onnx_files: dict[str, bytes], inputs: dict[str, bytes]
) -> None:
    models: dict[str, LoadedModel] = {
        v: load_model(data, threads=1) for v, data in onnx_files.items()
    }
    # What each version must answer for each input, computed directly.
    expected = {v: {name: infer_dicom_bytes(m, data, SECRET)["probabilities"]
                    for name, data in inputs.items()} for v, m in models.items()}  # fmt: skip
    for name in inputs:  # the two versions are distinguishable on every input
        assert abs(expected["1"][name]["present"] - expected["2"][name]["present"]) > 1e-3
    slot = ModelSlot(models["1"])
    server = InferenceServer(slot, SECRET, ServeConfig(port=0))
    server.start()
    stop = threading.Event()
    responses: list[tuple[str, int, dict[str, Any]]] = []
    errors: list[BaseException] = []
    names = sorted(inputs)

    def fire(offset: int) -> None:
        i = offset
        try:
            while not stop.is_set() or i < offset + 10:
                name = names[i % len(names)]
                status, body = _post(server.port, inputs[name])
                responses.append((name, status, body))
                i += 1
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=fire, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    try:
        swaps = 0
        for swaps in range(1, 9):  # eight swaps while requests are in flight
            time.sleep(0.05)
            slot.swap(models["2" if swaps % 2 else "1"])
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        server.shutdown()
    assert not errors and swaps == 8
    assert len(responses) >= 40
    seen = set()
    for name, status, body in responses:
        assert status == 200, body
        version = body["model_version"]
        assert version in expected
        # The probabilities are exactly what that version computes: no mixed request.
        assert body["probabilities"] == expected[version][name]
        seen.add(version)
    assert seen == {"1", "2"}


def _served_version(port: int) -> str | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/v1/model")
        response = conn.getresponse()
        body = json.loads(response.read())
        conn.close()
    except OSError:
        return None
    return str(body["model_version"]) if response.status == 200 else None


def _wait_for_version(port: int, version: str, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _served_version(port) == version:
            return True
        time.sleep(0.1)
    return False


def test_serve_command_swaps_a_replaced_model_file_and_logs_which_version_answered(
    onnx_files: dict[str, bytes], inputs: dict[str, bytes], tmp_path: Path
) -> None:
    """Also issue 19, point 10: `tessera node serve` writes JSON logs on stderr, and each
    request's line names the model version that answered it (and nothing of the patient)."""
    import os
    import signal
    import socket

    with socket.socket() as probe:  # a free port for the child
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    model_path = tmp_path / "model.onnx"
    model_path.write_bytes(onnx_files["1"])
    state = str(tmp_path / "state")
    command = [sys.executable, "-m", "tessera.cli", "node", "serve", "--model", str(model_path),
               "--state", state, "--port", str(port), "--watch", "0.2"]  # fmt: skip
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert _wait_for_version(port, "1")
        assert _post(port, inputs["CT_small.dcm"])[1]["model_version"] == "1"
        staging = tmp_path / "model.onnx.new"
        staging.write_bytes(onnx_files["2"])
        os.replace(staging, model_path)  # how a release is installed: atomically
        assert _wait_for_version(port, "2")
        assert _post(port, inputs["CT_small.dcm"])[1]["model_version"] == "2"
        assert _post(port, b"not DICOM")[0] == 400
        model_path.write_bytes(b"a damaged download")
        time.sleep(1.0)  # several polls: the bad file is rejected, version 2 keeps serving
        assert _served_version(port) == "2"
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            child.kill()
        _, err = child.communicate()
    lines = [json.loads(line) for line in err.decode().splitlines()]  # JSON, every line
    events = [line["event"] for line in lines]
    assert Event.SERVING in events and Event.SERVE_MODEL_SWAPPED in events
    assert Event.MODEL_UPDATE_REJECTED in events
    requests = [line for line in lines if line["event"] == Event.INFERENCE_REQUEST]
    answered = [(line["status"], line["model_version"]) for line in requests
                if line["method"] == "POST"]  # fmt: skip
    assert answered == [(200, "1"), (200, "2"), (400, None)]
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    for phi in (str(ds.SOPInstanceUID), str(ds.PatientName), str(ds.PatientID)):
        assert phi not in err.decode()
