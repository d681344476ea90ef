"""Read a DICOM object and decide, before decoding a single pixel, whether it is usable.

Every rejection raises `UnusableImageError` with one reason code from `REASONS`. Messages
are assembled from sizes, counts and transfer-syntax names only, never from an element's
value, so a quarantine entry cannot leak a patient's name or a UID. The declared
decompressed size is checked from the header (rows x columns x frames x samples x bits)
before any decoder runs, which is what stops a decompression bomb.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID

from node.errors import UnusableImageError
from node.intake.codestream import check_deflate
from tessera.limits import MAX_DECODED_IMAGE_BYTES, MAX_DICOM_OBJECT_BYTES

REASONS: dict[str, str] = {
    "not-dicom": "not a DICOM file",
    "truncated": "file ends before its declared content",
    "no-pixel-data": "DICOM object without an image",
    "no-decoder": "transfer syntax with no installed decoder",
    "dimensions": "image dimensions out of bounds",
    "decompressed-size": "declared decompressed size above the limit",
    "unsupported-image": "pixel layout the node does not handle",
    "corrupt-pixel-data": "pixel data the decoder rejected",
    "unreadable": "file could not be read from disk",
}

# What to install when a transfer syntax's decoder is missing, by pydicom decoder name.
_PLUGIN_HINTS = {
    "JPEG": "pylibjpeg-libjpeg (pip install pylibjpeg pylibjpeg-libjpeg)",
    "JPEG-LS": "pyjpegls (pip install pyjpegls)",
    "JPEG 2000": "pylibjpeg-openjpeg (pip install pylibjpeg pylibjpeg-openjpeg)",
    "HTJ2K": "pylibjpeg-openjpeg >= 2.0 (pip install pylibjpeg pylibjpeg-openjpeg)",
    "RLE": "pylibjpeg-rle (pip install pylibjpeg-rle)",
}
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass(frozen=True)
class IntakeLimits:
    """Bounds on what the node will decode; anything outside is quarantined, not decoded."""

    min_side: int = 8
    max_side: int = 16384
    max_frames: int = 4096
    max_decoded_bytes: int = MAX_DECODED_IMAGE_BYTES
    max_file_bytes: int = MAX_DICOM_OBJECT_BYTES

    def __post_init__(self) -> None:
        if not 1 <= self.min_side <= self.max_side:
            raise ValueError(
                f"need 1 <= min_side <= max_side, got {self.min_side}, {self.max_side}"
            )
        for name in ("max_frames", "max_decoded_bytes", "max_file_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def read_dataset(data: bytes, limits: IntakeLimits | None = None) -> Dataset:
    """Parse DICOM bytes (Part 10, or a bare dataset without preamble) into a Dataset.

    A deflated dataset is first inflated under a bound (node.intake.codestream.check_deflate).
    """
    limits = limits or IntakeLimits()
    check_deflate(data, limits.max_decoded_bytes + (16 << 20))
    with quiet_pydicom() as signals:
        ds = _read_dataset(data)
    if signals.ran_out or _ends_short(ds, len(data)):
        raise UnusableImageError("truncated", f"file ends inside an element ({len(data)} bytes)")
    return ds


def _ends_short(ds: Dataset, size: int) -> bool:
    """Whether the file stopped inside its last element, or inside the header of the next.

    pydicom accepts both silently: a short value read, and fewer than 8 bytes where the
    next element's header should be. Compare the last raw element with what it declares.
    """
    if not len(ds):
        return True  # a header with no dataset after it
    last = ds.get_item(list(ds.keys())[-1])  # the element parsed last
    length = getattr(last, "length", None)
    value = getattr(last, "value", None)
    if not isinstance(length, int) or length == 0xFFFFFFFF or not isinstance(value, bytes):
        return False
    if len(value) < length:
        return True
    tell = getattr(last, "value_tell", None)
    return isinstance(tell, int) and 0 < size - (tell + length) < 8


def alternative_plugins(syntax: UID) -> str:
    """Decoder plugins pydicom knows for `syntax` that are not installed, for error hints."""
    try:
        missing = get_decoder(syntax).missing_dependencies
    except NotImplementedError:
        return ""
    return "; ".join(missing)


def _read_dataset(data: bytes) -> Dataset:
    try:
        return pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError:
        pass
    except (EOFError, OSError) as error:
        raise UnusableImageError("truncated", f"{type(error).__name__} while parsing") from None
    except Exception as error:  # noqa: BLE001 - any parser failure is a quarantine, not a crash
        raise _parse_failure(error, len(data)) from None
    # No 'DICM' preamble: accept it only if a forced parse yields a recognisable object,
    # so text, JSON or images are not mistaken for a headerless dataset.
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        valid = any(tag in ds for tag in (0x00080016, 0x00080018, 0x7FE00010, 0x00280010))
    except Exception:  # noqa: BLE001
        valid = False
    if not valid:
        raise UnusableImageError("not-dicom", f"{len(data)} bytes with no DICOM preamble or header")
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = _guess_transfer_syntax(ds)
    return ds


def _parse_failure(error: Exception, size: int) -> UnusableImageError:
    text = str(error).lower()
    if any(word in text for word in ("end of file", "eof", "unpack requires", "truncated")):
        return UnusableImageError("truncated", f"parser ran out of data ({size} bytes)")
    return UnusableImageError("not-dicom", f"malformed DICOM ({type(error).__name__})")


def _guess_transfer_syntax(ds: Dataset) -> UID:
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if ds.is_little_endian is False:
        return ExplicitVRBigEndian
    return ImplicitVRLittleEndian if ds.is_implicit_VR else ExplicitVRLittleEndian


def frame_count(ds: Dataset) -> int:
    """Number of frames the header declares (1 when absent); `UnusableImageError` if malformed."""
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise UnusableImageError(
            "unsupported-image", "Number of Frames is not an integer"
        ) from None
    return max(frames, 1)


class _ParserSignals(logging.Handler):
    """Catches pydicom's own log records; keeps only whether the file ran out early."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.ran_out = False

    def emit(self, record: logging.LogRecord) -> None:
        """Note an 'Unexpected end of file'; drop the record (it may quote values)."""
        if "end of file" in record.getMessage().lower():
            self.ran_out = True


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[_ParserSignals]:
    """Keep pydicom's warnings and log records out of the node's output for the duration.

    pydicom quotes element values in both ("Invalid value for VR PN: 'DOE^JANE'"), which
    would put patient data into the node's logs; the node reports its own reason instead.
    pydicom also *logs*, rather than raises, a file that ends mid-element; the yielded
    signals object records that, so a truncated file is not mistaken for a short one.
    """
    logger = logging.getLogger("pydicom")
    if len(logger.handlers) == 1 and isinstance(logger.handlers[0], _ParserSignals):
        yield logger.handlers[0]  # already quiet (nested call): reuse the outer capture
        return
    saved = (logger.handlers[:], logger.propagate, logger.disabled, logger.level)
    signals = _ParserSignals()
    logger.handlers[:] = [signals]
    logger.propagate, logger.disabled = False, False
    # Every record reaches the signals handler, whatever level the node's logging set on
    # pydicom to keep it silent (tessera.observability.logs.silence_dicom_libraries).
    logger.setLevel(logging.DEBUG)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield signals
    finally:
        logger.handlers[:], logger.propagate, logger.disabled = saved[0], saved[1], saved[2]
        logger.setLevel(saved[3])


def screen_dataset(ds: Dataset, limits: IntakeLimits) -> None:
    """Raise `UnusableImageError` unless `ds` carries an image the node may decode."""
    keyword = next((k for k in _PIXEL_KEYWORDS if k in ds), None)
    if keyword is None:
        raise UnusableImageError("no-pixel-data", "no (7FE0,0010) Pixel Data element")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.BitsAllocated)
        int(ds.get("BitsStored", bits))
        int(ds.get("PixelRepresentation", 0))
    except (AttributeError, TypeError, ValueError):
        raise UnusableImageError(
            "unsupported-image",
            "Image Pixel module incomplete or malformed (Rows, Columns, Bits Allocated, "
            "Bits Stored or Pixel Representation)",
        ) from None
    frames = frame_count(ds)
    sides_ok = all(limits.min_side <= side <= limits.max_side for side in (rows, cols))
    if not sides_ok:
        raise UnusableImageError(
            "dimensions",
            f"{rows}x{cols} pixels; allowed sides are {limits.min_side}..{limits.max_side}",
        )
    if frames > limits.max_frames:
        raise UnusableImageError("dimensions", f"{frames} frames; the limit is {limits.max_frames}")
    if samples not in (1, 3) or bits not in (1, 8, 16, 32, 64):
        raise UnusableImageError(
            "unsupported-image", f"{samples} samples per pixel at {bits} bits allocated"
        )
    declared = rows * cols * frames * samples * bits // 8
    if declared > limits.max_decoded_bytes:
        raise UnusableImageError(
            "decompressed-size",
            f"declares {rows}x{cols}x{frames} frames x{samples} samples x{bits} bits = "
            f"{declared} bytes; the limit is {limits.max_decoded_bytes} "
            "(raise IntakeLimits.max_decoded_bytes if this is genuine)",
        )
    syntax = UID(ds.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2"))
    if syntax.is_compressed:
        _require_decoder(syntax)
    elif keyword == "PixelData":
        stored = len(ds.PixelData)
        # YBR_FULL_422 stores two samples per pixel on the wire, not three.
        photometric = str(ds.get("PhotometricInterpretation", "")).upper()
        wire_samples = 2 if photometric == "YBR_FULL_422" else samples
        expected = (rows * cols * frames * wire_samples * bits + 7) // 8
        if stored < expected:
            raise UnusableImageError(
                "truncated", f"pixel data holds {stored} of {expected} declared bytes"
            )


def _require_decoder(syntax: UID) -> None:
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise UnusableImageError(
            "no-decoder",
            f"no pydicom decoder exists for '{syntax.name}' ({syntax}); no plugin fixes this, "
            "ask the sender to transcode to a supported syntax (e.g. Explicit VR Little Endian)",
        ) from None
    if not decoder.is_available:
        family = next(
            (
                hint
                for name, hint in sorted(_PLUGIN_HINTS.items(), key=lambda kv: -len(kv[0]))
                if name.lower() in syntax.name.lower()
            ),
            ", ".join(decoder.missing_dependencies) or "a pydicom pixel decoder plugin",
        )
        raise UnusableImageError(
            "no-decoder", f"'{syntax.name}' needs a decoder that is not installed: install {family}"
        )
