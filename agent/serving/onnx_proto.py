"""Small ONNX models written as protobuf bytes by hand, for graphs the worker builds in memory
(`agent.serving.sampling`'s choice of tokens): the `onnx` package and its protobuf runtime
would cost the worker more memory than the graphs are worth.

Only what those graphs need: nodes with int, float, ints and string attributes, and inputs
and outputs of a tensor type with named or fixed dimensions. Field numbers are onnx.proto3's.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

# TensorProto.DataType
FLOAT, INT64, DOUBLE = 1, 7, 11
IR_VERSION = 8
OPSET = 18

Attribute = int | float | str | list[int]


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative ints are ten-byte two's complement, as protobuf writes them
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _int(number: int, value: int) -> bytes:
    return _key(number, 0) + _varint(value)


def _bytes(number: int, value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return _key(number, 2) + _varint(len(data)) + data


def _attribute(name: str, value: Attribute) -> bytes:
    # AttributeProto: name 1, f 2, i 3, s 4, ints 8, type 20 (FLOAT 1, INT 2, STRING 3, INTS 7).
    if isinstance(value, bool) or isinstance(value, int):
        body = _int(3, int(value)) + _int(20, 2)
    elif isinstance(value, float):
        body = _key(2, 5) + struct.pack("<f", value) + _int(20, 1)
    elif isinstance(value, str):
        body = _bytes(4, value) + _int(20, 3)
    else:
        body = b"".join(_int(8, v) for v in value) + _int(20, 7)
    return _bytes(1, name) + body


@dataclass(frozen=True)
class Node:
    op: str
    inputs: Sequence[str]
    outputs: Sequence[str]
    attributes: dict[str, Attribute] = field(default_factory=dict)

    def encode(self) -> bytes:
        # NodeProto: input 1, output 2, op_type 4, attribute 5.
        return (b"".join(_bytes(1, i) for i in self.inputs) + b"".join(_bytes(2, o) for o in self.outputs)
                + _bytes(4, self.op) + b"".join(_bytes(5, _attribute(k, v)) for k, v in self.attributes.items()))


@dataclass(frozen=True)
class Value:
    """A graph input or output: its element type and dimensions (a name for a dimension that varies)."""

    name: str
    element_type: int
    shape: Sequence[int | str]

    def encode(self) -> bytes:
        # ValueInfoProto: name 1, type 2; TypeProto.tensor_type 1; Tensor: elem_type 1, shape 2;
        # TensorShapeProto.dim 1; Dimension: dim_value 1, dim_param 2.
        dims = b"".join(_bytes(1, _bytes(2, d) if isinstance(d, str) else _int(1, d)) for d in self.shape)
        tensor = _int(1, self.element_type) + _bytes(2, dims)
        return _bytes(1, self.name) + _bytes(2, _bytes(1, tensor))


def model(name: str, nodes: Sequence[Node], inputs: Sequence[Value], outputs: Sequence[Value]) -> bytes:
    """A ModelProto holding one graph, for onnxruntime's CreateSessionFromArray."""
    # GraphProto: node 1, name 2, input 11, output 12. ModelProto: ir_version 1, producer_name 2,
    # graph 7, opset_import 8 (OperatorSetIdProto: version 2; the default domain).
    graph = (b"".join(_bytes(1, n.encode()) for n in nodes) + _bytes(2, name)
             + b"".join(_bytes(11, v.encode()) for v in inputs) + b"".join(_bytes(12, v.encode()) for v in outputs))
    return _int(1, IR_VERSION) + _bytes(2, "edgefleet") + _bytes(7, graph) + _bytes(8, _int(2, OPSET))


# -- reading and editing a model we did not write -------------------------------------------------

def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("a varint runs past the end")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


@dataclass(frozen=True)
class Field:
    number: int
    raw: bytes  # the whole field, key included, as it was written
    value: int | bytes  # a varint's value, or a length-delimited field's bytes (fixed-width: raw bytes)


def fields(data: bytes) -> list[Field]:
    """The top-level fields of one protobuf message, in order.

    Raises:
        ValueError: `data` is not a protobuf message.
    """
    out: list[Field] = []
    pos = 0
    while pos < len(data):
        start = pos
        key, pos = _read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        value: int | bytes
        if wire_type == 0:
            value, pos = _read_varint(data, pos)
        elif wire_type == 2:
            length, pos = _read_varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        elif wire_type in (1, 5):
            width = 8 if wire_type == 1 else 4
            value, pos = data[pos:pos + width], pos + width
        else:
            raise ValueError(f"wire type {wire_type} is not one ONNX uses")
        if pos > len(data):
            raise ValueError("a field runs past the end")
        out.append(Field(number, data[start:pos], value))
    return out


def _strings(message: bytes, number: int) -> list[str]:
    return [f.value.decode() for f in fields(message) if f.number == number and isinstance(f.value, bytes)]


def _graph(model_bytes: bytes) -> tuple[list[Field], int]:
    """The model's fields, and the index of its graph among them."""
    top = fields(model_bytes)
    graphs = [i for i, f in enumerate(top) if f.number == 7]
    if len(graphs) != 1:
        raise ValueError("the model has no graph")
    return top, graphs[0]


def positions_from(model_bytes: bytes, output: str, start: str) -> bytes:
    """The model with `output` computed only for the sequence positions from a new input, `start`
    (int64, shape [1]): the matrix product that makes it (a language model's head) reads
    `[:, start:, :]` of its input. A prefill then computes the rows of logits it reads, not one per
    prompt token.

    Raises:
        ValueError: `output` is not made by a MatMul or MatMulNBits (the model stays as it is).
    """
    top, at = _graph(model_bytes)
    graph = top[at].value
    if not isinstance(graph, bytes):
        raise ValueError("the model's graph is not a message")
    parts: list[bytes] = []
    found = False
    for f in fields(graph):
        if f.number == 1 and isinstance(f.value, bytes) and output in _strings(f.value, 2):
            op = _strings(f.value, 4)
            if op not in (["MatMul"], ["MatMulNBits"]):
                raise ValueError(f"{output} is made by {op}, not a matrix product")
            node = fields(f.value)
            first_input = next(i for i, n in enumerate(node) if n.number == 1)
            source = _strings(f.value, 1)[0]
            sliced = f"{source}/from_{start}"
            parts += [_bytes(1, n.encode()) for n in (
                Node("Constant", [], [f"{sliced}/ends"], {"value_ints": [(1 << 63) - 1]}),
                Node("Constant", [], [f"{sliced}/axes"], {"value_ints": [1]}),
                Node("Slice", [source, start, f"{sliced}/ends", f"{sliced}/axes"], [sliced]))]
            node[first_input] = Field(1, _bytes(1, sliced), sliced.encode())
            parts.append(_bytes(1, b"".join(n.raw for n in node)))
            found = True
        else:
            parts.append(f.raw)
    if not found:
        raise ValueError(f"no node makes {output}")
    parts.append(_bytes(11, Value(start, INT64, [1]).encode()))
    top[at] = Field(7, _bytes(7, b"".join(parts)), b"")
    return b"".join(f.raw for f in top)
