"""Tessera broker."""
