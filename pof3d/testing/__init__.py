"""Helpers for checking and timing the library; nothing in training imports this package."""
