"""Wheels for install tests: a real wheel under another distribution name, or an empty one.

Both are FAKES, named as such where a test uses them: the CUDA builds of onnxruntime(-genai) and
pip's CUDA libraries weigh hundreds of MB and cannot run here anyway.
"""

from __future__ import annotations

import base64
import hashlib
import re
import zipfile
from pathlib import Path


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _record(entries: dict[str, bytes], record_path: str) -> bytes:
    lines = []
    for path, data in entries.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{path},sha256={digest},{len(data)}")
    lines.append(f"{record_path},,")
    return ("\n".join(lines) + "\n").encode()


def _write(out: Path, entries: dict[str, bytes], dist_info: str) -> Path:
    record = f"{dist_info}/RECORD"
    entries = {p: d for p, d in entries.items() if p != record}
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for path, data in entries.items():
            z.writestr(path, data)
        z.writestr(record, _record(entries, record))
    return out


def make_wheel(out_dir: Path, name: str, version: str) -> Path:
    """A pure-Python wheel of `name` that installs nothing but its metadata."""
    dist_info = f"{_norm(name)}-{version}.dist-info"
    wheel = b"Wheel-Version: 1.0\nGenerator: testkit\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    entries = {f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
               f"{dist_info}/WHEEL": wheel}
    return _write(out_dir / f"{_norm(name)}-{version}-py3-none-any.whl", entries, dist_info)


def renamed_wheel(wheel: Path, name: str, out_dir: Path, requirements: dict[str, str] | None = None) -> Path:
    """`wheel` with the same files under the distribution name `name` (its METADATA, dist-info folder,
    file name and RECORD rewritten); `requirements` renames what it requires ({old: new})."""
    old_dist, version, rest = wheel.name.split("-", 2)
    old_info, new_info = f"{old_dist}-{version}.dist-info", f"{_norm(name)}-{version}.dist-info"
    entries: dict[str, bytes] = {}
    with zipfile.ZipFile(wheel) as z:
        for item in z.infolist():
            data = z.read(item)
            path = item.filename
            if path.startswith(old_info + "/"):
                path = new_info + path[len(old_info):]
                if path.endswith("/METADATA"):
                    data = re.sub(rb"(?m)^Name: .*$", f"Name: {name}".encode(), data, count=1)
                    for before, after in (requirements or {}).items():
                        data = re.sub(rf"(?m)^Requires-Dist: {re.escape(before)}\b(?!-)".encode(),
                                      f"Requires-Dist: {after}".encode(), data)
            entries[path] = data
    return _write(out_dir / f"{_norm(name)}-{version}-{rest}", entries, new_info)
