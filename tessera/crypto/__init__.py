"""The cryptography every member must agree on bit for bit: ring encoding, secret sharing,
HPKE sealing, signatures, canonical flattening and the update vector's layout.

Pure: no transport, torch or DICOM (an import-linter contract keeps it so)."""
