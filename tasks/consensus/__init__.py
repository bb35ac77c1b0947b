"""Combining the panel's readings: the weighted vote and measured reliability weights."""
