"""DICOM intake: watched folder, C-STORE receiver, quarantine ledger and preprocessing cache."""
