"""The wire: one codec, every protocol message, signed envelopes, releases and identifiers.
Pure: no transport, torch or DICOM."""
