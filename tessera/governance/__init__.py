"""Governance: the federation manifest, steward approvals, privacy reports and the hash-chained
audit log, all signed over canonical JSON."""
