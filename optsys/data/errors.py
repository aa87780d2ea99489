"""The one error type the data pipeline raises for bad input (a file, a row, a field)."""

from __future__ import annotations


class DataError(ValueError):
    """Bad training data: the message names the source, the row and the field, and what to do."""
