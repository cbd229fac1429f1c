"""edgefleet device agent: light dependencies only (no torch, no transformers)."""

__version__ = "0.1.0"
