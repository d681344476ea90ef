"""Build and encode one synthetic DICOM instance (CT Image or CR/DX Image storage)."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from node.synth.people import FakePatient

SOP_CLASSES = {
    "CT": UID("1.2.840.10008.5.1.4.1.1.2"),
    "CR": UID("1.2.840.10008.5.1.4.1.1.1"),
    "DX": UID("1.2.840.10008.5.1.4.1.1.1.1"),
}
SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "rle": RLELossless,
    "j2k": JPEG2000Lossless,
    "jpeg": JPEGBaseline8Bit,
    "jpegls": JPEGLSLossless,
}
# Root under which synthetic UIDs are derived (pydicom's own, for generated UIDs).
UID_ROOT = "1.2.826.0.1.3680043.8.498."


@dataclass(frozen=True)
class Scanner:
    """One site's acquisition character."""

    manufacturer: str
    model: str
    institution: str
    modality: str
    syntax: str
    photometric: str
    pixel_spacing: float
    noise: float
    offset: float


def uid_for(*parts: object) -> UID:
    """A deterministic UID derived from `parts` (seeded synthetic data only)."""
    return generate_uid(UID_ROOT, entropy_srcs=[str(p) for p in parts])


def stored_values(image: np.ndarray, scanner: Scanner) -> tuple[np.ndarray, int, float, float]:
    """(pixels, bits stored, slope, intercept) as the scanner would store `image`.

    CT images arrive in HU: stored = HU + 1024 (12 bit, intercept -1024), or HU / 8 at
    8 bits for a JPEG baseline site. Radiographs arrive as 0..4095 attenuation; MONOCHROME1
    stores them inverted so that a correct viewer shows the same picture.
    """
    if scanner.modality == "CT":
        if scanner.syntax == "jpeg":
            pixels = np.clip(np.rint((image + 1024.0) / 8.0), 0, 255)
            return pixels.astype(np.uint8), 8, 8.0, -1024.0
        pixels = np.clip(np.rint(image + 1024.0), 0, 4095)
        return pixels.astype(np.uint16), 12, 1.0, -1024.0
    values = 4095.0 - image if scanner.photometric == "MONOCHROME1" else image
    if scanner.syntax == "jpeg":
        return np.clip(np.rint(values / 16.0), 0, 255).astype(np.uint8), 8, 1.0, 0.0
    return np.clip(np.rint(values), 0, 4095).astype(np.uint16), 12, 1.0, 0.0


def build_instance(
    image: np.ndarray,
    scanner: Scanner,
    patient: FakePatient,
    uids: tuple[UID, UID, UID],
    instance_number: int,
) -> Dataset:
    """A complete Part 10 dataset for one image, encoded in the scanner's transfer syntax."""
    study_uid, series_uid, sop_uid = uids
    pixels, bits, slope, intercept = stored_values(image, scanner)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SOP_CLASSES[scanner.modality]
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = UID(UID_ROOT + "1")
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SOP_CLASSES[scanner.modality]
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = uid_for(study_uid, "frame")
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.AccessionNumber = patient.accession
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = patient.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = patient.study_time
    ds.ReferringPhysicianName = patient.referring
    ds.StudyID = patient.accession[-6:]
    ds.StudyDescription = "CT ABDOMEN" if scanner.modality == "CT" else "CHEST PA"
    ds.SeriesDescription = "AXIAL 5MM" if scanner.modality == "CT" else "PA"
    ds.InstitutionName = scanner.institution
    ds.Manufacturer = scanner.manufacturer
    ds.ManufacturerModelName = scanner.model
    ds.Modality = scanner.modality
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = "" if scanner.modality == "CT" else ["L", "F"]
    ds.PixelSpacing = [f"{scanner.pixel_spacing:.3f}", f"{scanner.pixel_spacing:.3f}"]
    if scanner.modality == "CT":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP = "120"
        ds.SliceThickness = "5.0"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.WindowCenter = str(2 ** (bits - 1))
        ds.WindowWidth = str(2**bits)
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleType = "HU" if scanner.modality == "CT" else "US"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = scanner.photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    _encode(ds, pixels, scanner.syntax)
    return ds


def _encode(ds: Dataset, pixels: np.ndarray, syntax: str) -> None:
    if syntax == "explicit":
        return
    if syntax == "jpeg":
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=92)
        ds.PixelData = encapsulate([buffer.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = f"{pixels.nbytes / len(buffer.getvalue()):.2f}"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        return
    ds.compress(SYNTAXES[syntax], pixels, generate_instance_uid=False)
