"""Pixels to what a radiologist would look at. Pool-safe: no Prefect, no model SDK imports."""
