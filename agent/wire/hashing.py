"""The one way edgefleet hashes a file (sha256, streamed in 1 MiB chunks)."""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK_BYTES = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file at `path`; memory use is one chunk whatever the size."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            h.update(chunk)  # hashlib releases the GIL on large buffers
    return h.hexdigest()
