"""The shared preprocessing path: windowing, inversion, frames, resize, limits, errors."""

from __future__ import annotations

import dataclasses
import io
import warnings

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import MPEG2MPML

from node.errors import UnusableImageError
from node.intake.preprocess import PreprocessConfig, decode_dicom_bytes, preprocess
from node.intake.resize import fitted_shape, resample_matrix, resize_to_square
from node.synth.people import FakePatient
from node.synth.writer import Scanner, build_instance, uid_for

PATIENT = FakePatient("Quillfeather^Ottoline^R", "MRN99887766", "19470312", "F",
                      "ACC5550001", "20240102", "101500", "Dr^Rahman^Aisha")  # fmt: skip
CT = Scanner("ACME", "X", "General", "CT", "explicit", "MONOCHROME2", 0.7, 10.0, 0.0)
DX = Scanner("ACME", "Y", "General", "DX", "explicit", "MONOCHROME2", 0.15, 40.0, 0.0)


def encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def instance(image: np.ndarray, scanner: Scanner = CT) -> Dataset:
    study = uid_for("test", image.shape, scanner.syntax)
    return build_instance(image, scanner, PATIENT, (study, uid_for(study, 1), uid_for(study, 2)), 1)


def test_digest_is_stable_and_covers_every_field() -> None:
    base = PreprocessConfig()
    assert base.digest() == PreprocessConfig().digest()
    changes = {"size": 32, "channels": 3, "window": "ct-lung", "frame": "first",
               "mean": 0.4, "std": 0.3}  # fmt: skip
    assert set(changes) == {f.name for f in dataclasses.fields(PreprocessConfig)}
    digests = {dataclasses.replace(base, **{k: v}).digest() for k, v in changes.items()}
    assert len(digests) == len(changes) and base.digest() not in digests


@pytest.mark.parametrize("bad", [{"size": 4}, {"channels": 2}, {"window": "lungs"},
                                 {"window": "40/0"}, {"frame": "last"}, {"std": 0.0}])  # fmt: skip
def test_invalid_config_is_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        PreprocessConfig(**bad)  # type: ignore[arg-type]


def test_ct_window_preset_maps_hu_to_the_expected_range() -> None:
    hu = np.full((32, 32), 40.0)
    hu[:, :8] = -1000.0
    hu[:, 24:] = 1000.0
    out = preprocess(instance(hu), PreprocessConfig(size=32, window="ct-soft-tissue"))
    # soft-tissue window 40/400: HU 40 -> 0.5 -> 0 after (x - 0.5) / 0.25
    assert out.shape == (1, 32, 32)
    assert abs(float(out[0, 16, 16])) < 0.02
    assert np.allclose(out[0, :, 2], -2.0) and np.allclose(out[0, :, 29], 2.0)


def test_file_window_is_used_by_default() -> None:
    hu = np.full((32, 32), 240.0)  # the synthetic CT carries window 40/400: 240 is its top
    out = preprocess(instance(hu), PreprocessConfig(size=32))
    assert np.allclose(out, 2.0, atol=0.01)


def test_monochrome1_is_inverted_to_look_like_monochrome2() -> None:
    rng = np.random.default_rng(0)
    attenuation = rng.uniform(0, 4095, size=(40, 32))
    mono2 = preprocess(instance(attenuation, DX), PreprocessConfig(size=32))
    mono1_scanner = dataclasses.replace(DX, photometric="MONOCHROME1")
    mono1 = preprocess(instance(attenuation, mono1_scanner), PreprocessConfig(size=32))
    assert np.allclose(mono1, mono2, atol=1e-3)
    assert not np.allclose(mono2, -mono2)  # not trivially symmetric


def test_aspect_ratio_is_kept_and_the_rest_padded() -> None:
    attenuation = np.full((64, 32), 4095.0)
    out = preprocess(instance(attenuation, DX), PreprocessConfig(size=32, window="minmax"))
    assert fitted_shape(64, 32, 32) == (32, 16)
    # the image fills columns 8..23, the padding is black (0 -> -2 after normalising)
    assert np.allclose(out[0, :, :8], -2.0) and np.allclose(out[0, :, 24:], -2.0)


def test_resample_weights_are_normalised_and_preserve_constants() -> None:
    for n_in, n_out in [(512, 64), (64, 64), (30, 64), (7, 3)]:
        weights = resample_matrix(n_in, n_out)
        assert weights.shape == (n_out, n_in)
        assert np.allclose(weights.sum(axis=1), 1.0, atol=1e-5)
    flat = np.full((1, 100, 50), 0.7, dtype=np.float32)
    assert np.allclose(resize_to_square(flat, 20)[0, :, 5:15], 0.7, atol=1e-5)


def multiframe(frames: list[float]) -> Dataset:
    ds = instance(np.zeros((16, 16)))
    stack = np.stack([np.full((16, 16), v, dtype=np.uint16) for v in frames])
    ds.NumberOfFrames = len(frames)
    ds.PixelData = stack.tobytes()
    ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
    return ds


def test_frame_policy_takes_the_middle_or_first_frame() -> None:
    ds = multiframe([0.0, 100.0, 200.0])
    cfg = PreprocessConfig(size=16, window="100/201")
    middle = preprocess(ds, cfg)
    first = preprocess(ds, dataclasses.replace(cfg, frame="first"))
    assert np.allclose(middle, 0.0, atol=0.02)  # 100 is the window centre
    assert np.allclose(first, -2.0, atol=0.02)


def test_rgb_becomes_luminance_or_three_channels() -> None:
    from pydicom.data import get_testdata_file

    data = open(get_testdata_file("SC_rgb_rle.dcm"), "rb").read()
    grey = decode_dicom_bytes(data, PreprocessConfig(size=16))
    colour = decode_dicom_bytes(data, PreprocessConfig(size=16, channels=3))
    assert grey.shape == (1, 16, 16) and colour.shape == (3, 16, 16)
    luma = np.tensordot(np.array([0.299, 0.587, 0.114]), colour * 0.25 + 0.5, axes=1)
    assert np.allclose(grey[0] * 0.25 + 0.5, luma, atol=1e-4)
    assert not np.allclose(colour[0], colour[1])  # real colour, not replicated grey


def reason_of(data: bytes, **limits: int) -> UnusableImageError:
    from node.intake.screen import IntakeLimits

    with pytest.raises(UnusableImageError) as caught:
        decode_dicom_bytes(data, PreprocessConfig(size=16), IntakeLimits(**limits))
    return caught.value


def test_decompression_bomb_is_refused_from_the_header_before_decoding() -> None:
    ds = instance(np.zeros((32, 32)), dataclasses.replace(CT, syntax="j2k"))
    ds.Rows = ds.Columns = 16000
    ds.NumberOfFrames = 50
    error = reason_of(encode(ds))
    # The codestream is 32x32; had it been decoded, the reason would be a decoder error.
    assert error.reason == "decompressed-size"
    assert "16000x16000x50" in error.detail


def test_dimensions_out_of_bounds() -> None:
    assert reason_of(encode(instance(np.zeros((32, 32)))), min_side=64).reason == "dimensions"


def test_transfer_syntax_without_any_decoder_is_named() -> None:
    ds = instance(np.zeros((16, 16)))
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
    error = reason_of(encode(ds))
    assert error.reason == "no-decoder" and "MPEG2" in error.detail


def test_not_dicom_and_truncated() -> None:
    assert reason_of(b"%PDF-1.7 hello").reason == "not-dicom"
    data = encode(instance(np.zeros((32, 32))))
    assert reason_of(data[: len(data) - 500]).reason == "truncated"


def test_errors_and_warnings_never_quote_patient_data() -> None:
    ds = instance(np.zeros((16, 16)))
    ds.NumberOfFrames = "7777777777"  # placeholder, swapped below for a malformed value
    data = encode(ds).replace(b"7777777777", b"Quillfeath")
    assert b"Quillfeath" in data
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        error = reason_of(data)
    assert error.reason == "unsupported-image"
    assert "Quillfeath" not in str(error)
    assert not [w for w in caught if "Quillfeath" in str(w.message)]


def test_missing_decoder_plugin_names_the_package_that_fixes_it() -> None:
    """With the JPEG 2000 plugins unregistered, as on a node without them installed."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEG2000Lossless

    data = encode(instance(np.zeros((32, 32)), dataclasses.replace(CT, syntax="j2k")))
    decoder = get_decoder(JPEG2000Lossless)
    saved = dict(decoder._available)
    try:
        for label in list(saved):
            decoder.remove_plugin(label)
        assert not decoder.is_available
        error = reason_of(data)
    finally:
        decoder._available.update(saved)
    assert error.reason == "no-decoder"
    assert "pylibjpeg-openjpeg" in error.detail
    assert decoder.is_available and decode_dicom_bytes(data, PreprocessConfig(size=16)).shape


@pytest.mark.parametrize("syntax", ["j2k", "jpeg", "jpegls"])
def test_codestream_larger_than_the_header_is_refused_before_decoding(syntax: str) -> None:
    ds = instance(np.zeros((64, 64)), dataclasses.replace(CT, syntax=syntax))
    ds.Rows = ds.Columns = 16  # the header understates what the decoder would allocate
    error = reason_of(encode(ds))
    assert error.reason == "decompressed-size" and "64x64" in error.detail


def test_deflate_bomb_is_refused_before_parsing() -> None:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = instance(np.zeros((16, 16)))
    ds.PixelData = bytes(40 << 20)  # 40 MiB of zeros deflates to a few dozen KiB
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    data = encode(ds)
    assert len(data) < 1 << 20
    assert reason_of(data, max_decoded_bytes=1 << 20).reason == "decompressed-size"
    # within the bound, the same kind of file reads normally (and is then screened)
    small = instance(np.zeros((16, 16)))
    small.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    assert decode_dicom_bytes(encode(small), PreprocessConfig(size=16)).shape == (1, 16, 16)
