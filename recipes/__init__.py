"""Shipped recipes and the bundled demo data (package data)."""
