"""Jalur: a transaction routing proxy."""

__version__ = "0.1.0"
