"""`tessera demo`: a whole federation on one machine, with a report."""
