"""Every file that ships inside pydicom is either ingested or quarantined with its reason.

The expected outcome of each file is recorded here, by its path inside pydicom's test-file
folder. Notes on the less obvious ones:
- JPEG-lossy.dcm: a malformed JPEG Extended stream that pylibjpeg and Pillow both reject
  (pydicom's own tests decode it only with GDCM) -> corrupt-pixel-data, naming gdcm.
- JPEG2000-embedded-sequence-delimiter.dcm: the first fragment's bytes read as a J2K SIZ
  declaring far more pixels than the header's Rows x Columns (Pillow, asked to decode it,
  calls it a decompression bomb) -> decompressed-size, refused before any decoder runs.
- badVR.dcm: Number of Frames is '1A' -> unsupported-image.
- meta_missing_tsyntax.dcm, nested_priv_SQ.dcm: pixel data without Rows/Columns.
- no_meta.dcm: no preamble and a stray leading byte; pydicom mis-parses it even with force.
- SC_rgb_small_odd*.dcm: 3x3 pixels, below the 8-pixel minimum side.
- rtplan_truncated.dcm: ends inside an element, which pydicom reads silently -> truncated.
- DICOMDIRs, SR, RT plan/struct, waveform, and the DICOMDIR's IM* records: no-pixel-data.
"""

from __future__ import annotations

from pathlib import Path

import pydicom.data
import pytest
from pydicom.data import get_testdata_files

from node.intake.ingest import IntakeConfig, run_ingest
from node.intake.preprocess import PreprocessConfig
from node.intake.screen import REASONS, IntakeLimits
from node.intake.worker import FileTask, WorkerContext, ingest_file

OK = "ingested"
ROOT = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent
EXPECTED: dict[str, str] = {
    "693_J2KI.dcm": OK,
    "CT_small.dcm": OK,
    "ExplVR_BigEnd.dcm": OK,
    "ExplVR_BigEndNoMeta.dcm": "no-pixel-data",
    "ExplVR_LitEndNoMeta.dcm": "no-pixel-data",
    "GDCMJ2K_TextGBR.dcm": OK,
    "J2K_pixelrep_mismatch.dcm": OK,
    "JPEG-lossy.dcm": "corrupt-pixel-data",
    "JPEG2000-embedded-sequence-delimiter.dcm": "decompressed-size",
    "JPEG2000.dcm": OK,
    "JPEGLSNearLossless_08.dcm": OK,
    "JPEGLSNearLossless_16.dcm": OK,
    "JPGExtended.dcm": OK,
    "MR_small.dcm": OK,
    "MR_small_RLE.dcm": OK,
    "MR_small_bigendian.dcm": OK,
    "MR_small_expb.dcm": OK,
    "MR_small_implicit.dcm": OK,
    "MR_small_jp2klossless.dcm": OK,
    "MR_small_jpeg_ls_lossless.dcm": OK,
    "MR_small_padded.dcm": OK,
    "MR_truncated.dcm": "truncated",
    "README.txt": "not-dicom",
    "SC_jpeg_no_color_transform.dcm": OK,
    "SC_jpeg_no_color_transform_2.dcm": OK,
    "SC_rgb_dcmtk_+eb+cr.dcm": OK,
    "SC_rgb_dcmtk_+eb+cy+n1.dcm": OK,
    "SC_rgb_dcmtk_+eb+cy+n2.dcm": OK,
    "SC_rgb_dcmtk_+eb+cy+np.dcm": OK,
    "SC_rgb_dcmtk_+eb+cy+s2.dcm": OK,
    "SC_rgb_dcmtk_+eb+cy+s4.dcm": OK,
    "SC_rgb_gdcm_KY.dcm": OK,
    "SC_rgb_jls_lossy_line.dcm": OK,
    "SC_rgb_jls_lossy_sample.dcm": OK,
    "SC_rgb_jpeg.dcm": OK,
    "SC_rgb_jpeg_app14_dcmd.dcm": OK,
    "SC_rgb_jpeg_dcmd.dcm": OK,
    "SC_rgb_jpeg_dcmtk.dcm": OK,
    "SC_rgb_jpeg_gdcm.dcm": OK,
    "SC_rgb_jpeg_lossy_gdcm.dcm": OK,
    "SC_rgb_rle.dcm": OK,
    "SC_rgb_rle_16bit.dcm": OK,
    "SC_rgb_rle_16bit_2frame.dcm": OK,
    "SC_rgb_rle_2frame.dcm": OK,
    "SC_rgb_rle_32bit.dcm": OK,
    "SC_rgb_rle_32bit_2frame.dcm": OK,
    "SC_rgb_small_odd.dcm": "dimensions",
    "SC_rgb_small_odd_big_endian.dcm": "dimensions",
    "SC_rgb_small_odd_jpeg.dcm": "dimensions",
    "SC_ybr_full_422_uncompressed.dcm": OK,
    "UN_sequence.dcm": "no-pixel-data",
    "badVR.dcm": "unsupported-image",
    "crayons.icc": "not-dicom",
    "dicomdirtests/77654033/CR1/6154": OK,
    "dicomdirtests/77654033/CR2/6247": OK,
    "dicomdirtests/77654033/CR3/6278": OK,
    "dicomdirtests/77654033/CT2/17106": OK,
    "dicomdirtests/77654033/CT2/17136": OK,
    "dicomdirtests/77654033/CT2/17166": OK,
    "dicomdirtests/77654033/CT2/17196": OK,
    "dicomdirtests/98892001/CT2N/6293": OK,
    "dicomdirtests/98892001/CT2N/6924": OK,
    "dicomdirtests/98892001/CT5N/2062": OK,
    "dicomdirtests/98892001/CT5N/2392": OK,
    "dicomdirtests/98892001/CT5N/2693": OK,
    "dicomdirtests/98892001/CT5N/3023": OK,
    "dicomdirtests/98892001/CT5N/3353": OK,
    "dicomdirtests/98892003/MR1/15820": OK,
    "dicomdirtests/98892003/MR1/4919": OK,
    "dicomdirtests/98892003/MR1/5641": OK,
    "dicomdirtests/98892003/MR2/15970": OK,
    "dicomdirtests/98892003/MR2/4950": OK,
    "dicomdirtests/98892003/MR2/4981": OK,
    "dicomdirtests/98892003/MR2/5011": OK,
    "dicomdirtests/98892003/MR2/6273": OK,
    "dicomdirtests/98892003/MR2/6605": OK,
    "dicomdirtests/98892003/MR2/6935": OK,
    "dicomdirtests/98892003/MR700/4467": OK,
    "dicomdirtests/98892003/MR700/4528": OK,
    "dicomdirtests/98892003/MR700/4558": OK,
    "dicomdirtests/98892003/MR700/4588": OK,
    "dicomdirtests/98892003/MR700/4618": OK,
    "dicomdirtests/98892003/MR700/4648": OK,
    "dicomdirtests/98892003/MR700/4678": OK,
    "dicomdirtests/DICOMDIR": "no-pixel-data",
    "dicomdirtests/DICOMDIR-bigEnd": "no-pixel-data",
    "dicomdirtests/DICOMDIR-empty.dcm": "no-pixel-data",
    "dicomdirtests/DICOMDIR-implicit": "no-pixel-data",
    "dicomdirtests/DICOMDIR-nooffset": "no-pixel-data",
    "dicomdirtests/DICOMDIR-nopatient": "no-pixel-data",
    "dicomdirtests/DICOMDIR-reordered": "no-pixel-data",
    "dicomdirtests/README.txt": "not-dicom",
    "dicomdirtests/TINY_ALPHA/DICOMDIR": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000000": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000001": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000002": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000003": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000004": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000005": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000006": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000007": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000008": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000009": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000A": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000B": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000C": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000D": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000E": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000F": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000G": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000H": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000I": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000J": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000K": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000L": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000M": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000N": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000O": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000P": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000Q": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000R": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000S": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000T": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000U": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000V": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000W": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000X": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000Y": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000Z": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000010": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000011": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000012": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000013": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000014": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000015": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000016": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000017": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000018": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000019": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00001A": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00001B": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00001C": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00001D": "no-pixel-data",
    "dicomdirtests/TINY_ALPHA/README": "not-dicom",
    "empty_charset_LEI.dcm": "no-pixel-data",
    "examples_jpeg2k.dcm": OK,
    "examples_overlay.dcm": OK,
    "examples_palette.dcm": OK,
    "examples_rgb_color.dcm": OK,
    "examples_ybr_color.dcm": OK,
    "image_dfl.dcm": OK,
    "liver_1frame.dcm": OK,
    "liver_expb_1frame.dcm": OK,
    "meta_missing_tsyntax.dcm": "unsupported-image",
    "nested_priv_SQ.dcm": "unsupported-image",
    "no_meta.dcm": "not-dicom",
    "no_meta_group_length.dcm": "no-pixel-data",
    "priv_SQ.dcm": "no-pixel-data",
    "reportsi.dcm": "no-pixel-data",
    "reportsi_with_empty_number_tags.dcm": "no-pixel-data",
    "rtdose.dcm": OK,
    "rtdose_1frame.dcm": OK,
    "rtdose_expb.dcm": OK,
    "rtdose_expb_1frame.dcm": OK,
    "rtdose_rle.dcm": OK,
    "rtdose_rle_1frame.dcm": OK,
    "rtplan.dcm": "no-pixel-data",
    "rtplan.dump": "not-dicom",
    "rtplan_truncated.dcm": "truncated",
    "rtstruct.dcm": "no-pixel-data",
    "rtstruct.dump": "not-dicom",
    "test-SR.dcm": "no-pixel-data",
    "test1.json": "not-dicom",
    "test_PN.json": "not-dicom",
    "waveform_ecg.dcm": "no-pixel-data",
    "zipMR.gz": "not-dicom",
}


def shipped_files() -> list[str]:
    """Every regular file pydicom ships as test data, relative to its folder."""
    # Only the files inside the installed package: a pydicom-data download, where present,
    # adds more that this table does not describe.
    return sorted(Path(f).relative_to(ROOT).as_posix() for f in get_testdata_files()
                  if Path(f).is_file() and Path(f).is_relative_to(ROOT))  # fmt: skip


def test_table_covers_every_shipped_file() -> None:
    assert shipped_files() == sorted(EXPECTED)
    assert set(EXPECTED.values()) - {OK} <= set(REASONS)


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> WorkerContext:
    cache = tmp_path_factory.mktemp("cache")
    return WorkerContext(cache, PreprocessConfig(), IntakeLimits(), b"s" * 32)


@pytest.mark.parametrize("relative", sorted(EXPECTED))
def test_file_outcome(relative: str, context: WorkerContext) -> None:
    path = ROOT / relative
    record = ingest_file(FileTask(str(path), "k", path.stat().st_size, 0, None), context)
    outcome = record.status if record.status == OK else record.reason
    assert outcome == EXPECTED[relative], record.detail
    if record.status == OK:
        assert record.instance_key and len(record.instance_key) == 32
    else:
        assert record.detail  # a specific, non-empty explanation


def test_jpeg_lossy_names_the_plugin_that_could_fix_it(context: WorkerContext) -> None:
    path = ROOT / "JPEG-lossy.dcm"
    record = ingest_file(FileTask(str(path), "k", path.stat().st_size, 0, None), context)
    assert record.reason == "corrupt-pixel-data"
    assert "gdcm" in (record.detail or "")


def test_every_compressed_syntax_with_a_decoder_is_decoded() -> None:
    """Each compressed transfer syntax among the shipped files decodes in at least one file."""
    import warnings

    from pydicom import dcmread
    from pydicom.pixels import get_decoder

    by_syntax: dict[str, list[str]] = {}
    for relative, outcome in EXPECTED.items():
        if not relative.endswith(".dcm"):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = dcmread(ROOT / relative, stop_before_pixels=True)
            except Exception:  # noqa: BLE001 - unreadable ones are covered by the table
                continue
        syntax = ds.file_meta.get("TransferSyntaxUID")
        if syntax is not None and syntax.is_compressed:
            by_syntax.setdefault(str(syntax), []).append(outcome)
    assert len(by_syntax) >= 8
    for syntax, outcomes in by_syntax.items():
        if get_decoder(syntax).is_available:
            assert OK in outcomes, f"no file in {syntax} was decoded: {outcomes}"


def test_whole_corpus_through_the_intake_leaves_files_untouched(tmp_path: Path) -> None:
    """One real pass (2 workers) over a copy of the corpus: counts match the table."""
    import hashlib
    import shutil

    intake = tmp_path / "intake"
    shutil.copytree(ROOT, intake)
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in intake.rglob("*")
              if p.is_file()}  # fmt: skip
    mtimes = {p: p.stat().st_mtime_ns for p in before}
    summary = run_ingest(IntakeConfig(intake, tmp_path / "state", workers=2))
    expected_quarantine = [v for v in EXPECTED.values() if v != OK]
    assert summary.ingested == len(EXPECTED) - len(expected_quarantine)
    assert summary.quarantined == len(expected_quarantine)
    assert sum(summary.reasons.values()) == len(expected_quarantine)
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in before}
    assert after == before
    assert {p: p.stat().st_mtime_ns for p in before} == mtimes
    assert sorted(p for p in intake.rglob("*") if p.is_file()) == sorted(before)
