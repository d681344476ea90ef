"""Placeholder: being written for issue 2."""
