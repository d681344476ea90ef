"""Helpers that start real processes for integration tests (Mosquitto, an HTTP proxy)."""
