"""What a model dir makes onnxruntime open, checked before it is loaded.

TUF proves the files are the ones the operator signed; it does not prove they stay inside
their dir. `genai_config.json` names model files, custom operator libraries and profiling
outputs by path, and an ONNX initializer's external data names its file by `location`:
onnxruntime follows them all at load. A signed package that points outside itself (an
absolute path, `..`, a symlink) would turn "verified files" into any file on the device, or
native code from anywhere. So every such path must be a relative path to a regular file of
the model dir, custom operator libraries are refused unless the device allows them
(`allow_custom_ops`), and profiling (which writes files) is refused.

The ONNX files are read with a small protobuf walker over a memory map (the agent has no
`onnx` package): it visits ModelProto.graph, its initializers, node attributes and
subgraphs, skipping every tensor's data by its length, so the pages of embedded weights
are never touched.
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent.wire.errors import ActivationError
from agent.wire.paths import check_relative_path

GENAI_CONFIG = "genai_config.json"
# Keys of genai_config.json whose string values onnxruntime-genai opens as files.
_FILE_KEYS = frozenset({"filename", "config_filename", "adapter_filename"})
_CUSTOM_OPS_KEYS = frozenset({"custom_ops_library", "custom_ops_libraries"})
_PROFILING_KEYS = frozenset({"enable_profiling", "profile_file_prefix"})
_MAX_ONNX_DEPTH = 64  # subgraph nesting; deeper is not a model


def check_model_dir(model_dir: Path, *, allow_custom_ops: bool = False) -> None:
    """Raises:
        ActivationError: a path the model would open points outside `model_dir` or at no regular
            file in it, a custom operator library is named and not allowed, or profiling is on.
    """
    root = model_dir.resolve()
    config_path = model_dir / GENAI_CONFIG
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise ActivationError(f"{config_path} cannot be read as JSON ({e}): pass a dir built by edge-builder") from e
    onnx_files: list[Path] = []
    for key, value, where in _walk_json(config, "genai_config"):
        if key in _CUSTOM_OPS_KEYS and not allow_custom_ops:
            raise ActivationError(f"{config_path}: {where} names a custom operator library ({value!r}): native code"
                                  " the device does not load unless its config says allow_custom_ops = true")
        if key in _PROFILING_KEYS and value not in (False, None, ""):
            raise ActivationError(f"{config_path}: {where} turns on profiling, which writes files outside the"
                                  " model dir: refused")
        if key in _FILE_KEYS or (key in _CUSTOM_OPS_KEYS and allow_custom_ops):
            for name in value if isinstance(value, list) else [value]:
                target = _inside(root, name, f"{config_path}: {where}")
                if target.suffix == ".onnx":
                    onnx_files.append(target)
    for onnx in onnx_files:
        for location in external_data_locations(onnx):
            _inside(onnx.parent.resolve(), location, f"{onnx.name}: external data location")


def _inside(root: Path, name: Any, where: str) -> Path:
    if not isinstance(name, str):
        raise ActivationError(f"{where} is {name!r}, not a file name")
    try:
        check_relative_path(name)
    except ValueError as e:
        raise ActivationError(f"{where} names {name!r}, not a path inside the model dir ({e}): refused") from e
    target = (root / name).resolve()
    if not target.is_relative_to(root) or not target.is_file() or (root / name).is_symlink():
        raise ActivationError(f"{where} names {name!r}, which is not a regular file inside the model dir: refused")
    return target


def _walk_json(node: Any, where: str) -> Iterator[tuple[str, Any, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value, f"{where}.{key}"
            yield from _walk_json(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _walk_json(item, f"{where}[{i}]")


# -- ONNX (protobuf) -------------------------------------------------------------------------
# Field numbers from onnx.proto3.
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
_NODE_ATTRIBUTE = 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS = 5, 6, 10, 11
_TENSOR_EXTERNAL_DATA = 13
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_ENTRY_KEY, _ENTRY_VALUE = 1, 2


_Buffer = bytes | mmap.mmap
_Span = tuple[int, int]  # [start, end) of a length-delimited field in the buffer


def external_data_locations(onnx_path: Path) -> set[str]:
    """Every external-data `location` in an ONNX model file.

    Raises:
        ActivationError: the file is not a readable ONNX protobuf.
    """
    locations: set[str] = set()
    try:
        with open(onnx_path, "rb") as f:
            if f.seek(0, 2) == 0:
                raise ValueError("the file is empty")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                for field, value in _fields(buf, (0, len(buf))):
                    if field == _MODEL_GRAPH and isinstance(value, tuple):
                        _graph(buf, value, locations, 0)
    except OSError as e:
        raise ActivationError(f"{onnx_path} cannot be read: {e.strerror or e}") from e
    except (ValueError, IndexError) as e:
        raise ActivationError(f"{onnx_path} is not a valid ONNX model ({e}): refused") from e
    return locations


def _graph(buf: _Buffer, span: _Span, out: set[str], depth: int) -> None:
    if depth > _MAX_ONNX_DEPTH:
        raise ValueError("subgraphs nested too deeply")
    for field, value in _fields(buf, span):
        if not isinstance(value, tuple):
            continue
        if field == _GRAPH_INITIALIZER:
            _tensor(buf, value, out)
        elif field == _GRAPH_SPARSE_INITIALIZER:
            for sub, part in _fields(buf, value):
                if sub in (_SPARSE_VALUES, _SPARSE_INDICES) and isinstance(part, tuple):
                    _tensor(buf, part, out)
        elif field == _GRAPH_NODE:
            for sub, attribute in _fields(buf, value):
                if sub == _NODE_ATTRIBUTE and isinstance(attribute, tuple):
                    _attribute(buf, attribute, out, depth)


def _attribute(buf: _Buffer, span: _Span, out: set[str], depth: int) -> None:
    for field, value in _fields(buf, span):
        if not isinstance(value, tuple):
            continue
        if field in (_ATTR_T, _ATTR_TENSORS):
            _tensor(buf, value, out)
        elif field in (_ATTR_G, _ATTR_GRAPHS):
            _graph(buf, value, out, depth + 1)


def _tensor(buf: _Buffer, span: _Span, out: set[str]) -> None:
    for field, value in _fields(buf, span):
        if field == _TENSOR_EXTERNAL_DATA and isinstance(value, tuple):
            entry = {k: buf[v[0]:v[1]] for k, v in _fields(buf, value) if isinstance(v, tuple)}
            if entry.get(_ENTRY_KEY) == b"location":
                out.add(bytes(entry.get(_ENTRY_VALUE, b"")).decode("utf-8", "replace"))


def _fields(buf: _Buffer, span: _Span) -> Iterator[tuple[int, int | _Span]]:
    """(field number, value) of one protobuf message in `buf[span]`: varints as ints,
    length-delimited fields as spans (nothing copied), fixed-width fields skipped."""
    pos, end = span
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield field, value
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise ValueError(f"field {field} runs past the end of its message")
            yield field, (pos, pos + length)
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _varint(buf: _Buffer, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("a varint longer than 10 bytes")
