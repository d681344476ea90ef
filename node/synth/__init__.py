"""Synthetic hospitals: realistic multi-site DICOM with fake PHI and a lesion task."""
