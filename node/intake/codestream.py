"""Decompression-bomb guards that look inside the compressed bytes, before any decoder runs.

The header check (node.intake.screen) bounds what the DICOM header declares. Two more ways to
make a small file expand hugely are closed here:

- an image codestream (JPEG, JPEG-LS, JPEG 2000) that declares larger dimensions than the
  DICOM header: the decoder allocates what the codestream says, so the codestream's own
  frame size is read from its SOF / SIZ marker and must not exceed Rows x Columns;
- Deflated Explicit VR Little Endian, which pydicom inflates whole while parsing: the
  deflate stream is inflated here first, with a hard output bound.
"""

from __future__ import annotations

import io
import struct
import zlib

from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.pixels.utils import _get_jpg_parameters
from pydicom.uid import DeflatedExplicitVRLittleEndian

from node.errors import UnusableImageError

_J2K_SIZ = b"\xff\x4f\xff\x51"  # SOC then SIZ: the start of every J2K codestream


def j2k_dimensions(codestream: bytes) -> tuple[int, int] | None:
    """(rows, columns) from a JPEG 2000 codestream's SIZ marker, or None if absent."""
    at = codestream.find(_J2K_SIZ, 0, 4096)  # a JP2 wrapper puts boxes first
    if at < 0 or len(codestream) < at + 24:
        return None
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", codestream[at + 8 : at + 24])
    return max(ysiz - yosiz, 0), max(xsiz - xosiz, 0)


def codestream_dimensions(codestream: bytes) -> tuple[int, int] | None:
    """(rows, columns) a JPEG-family codestream declares, or None if it cannot be read."""
    found = j2k_dimensions(codestream)
    if found is not None:
        return found
    try:
        info = _get_jpg_parameters(codestream)
    except Exception:  # noqa: BLE001 - unreadable markers: the decoder will reject it
        return None
    if "height" in info and "width" in info:
        return int(info["height"]), int(info["width"])
    return None


def check_codestream(ds: Dataset, index: int, frames: int) -> None:
    """Refuse frame `index` if its codestream declares more pixels than the header."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None or not syntax.is_compressed or "RLE" in syntax.name:
        return  # RLE output is sized by the header, not by the stream
    try:
        frame = get_frame(ds.PixelData, index, number_of_frames=frames)
    except Exception:  # noqa: BLE001 - malformed encapsulation: the decoder reports it
        return
    declared = codestream_dimensions(frame)
    if declared is None:
        return
    rows, cols = int(ds.Rows), int(ds.Columns)
    if declared[0] * declared[1] > rows * cols:
        raise UnusableImageError(
            "decompressed-size",
            f"codestream declares {declared[0]}x{declared[1]} pixels but the header "
            f"{rows}x{cols}; refusing to let the decoder allocate for it",
        )


def check_deflate(data: bytes, max_inflated: int) -> None:
    """Refuse a Deflated Explicit VR file whose dataset inflates to more than `max_inflated`."""
    if DeflatedExplicitVRLittleEndian.encode() not in data[:2048]:
        return
    fp = io.BytesIO(data)
    try:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
    except Exception:  # noqa: BLE001 - not Part 10: the parser decides what it is
        return
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflater.decompress(fp.read(), max_inflated)
    except zlib.error:
        raise UnusableImageError("corrupt-pixel-data", "deflate stream is corrupt") from None
    if inflater.unconsumed_tail:
        raise UnusableImageError(
            "decompressed-size",
            f"deflated dataset inflates to more than {max_inflated} bytes",
        )
