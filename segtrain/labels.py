"""Label conventions shared by data, losses and metrics."""

IGNORE_INDEX = -1
"""Class index of pixels that count in no loss and no metric (mapped from the config's ignore value)."""
