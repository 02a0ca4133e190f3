"""Shared pure functions used by every area."""
