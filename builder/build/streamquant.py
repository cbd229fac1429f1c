"""onnxruntime-genai's model builder, quantizing weight by weight as the model is written.

The stock builder quantizes INT4/INT8 in one pass over a copy of the whole graph
(`Model.to_nbits`): it serializes every full-precision weight into one ModelProto, runs
onnxruntime's MatMulNBitsQuantizer on it, and parses the result back, so its peak holds the
model several times over (figures: README "Builder"). This entry point runs
the same builder with `to_nbits` replaced, for the recipe the builder's own default takes
(MLAS's blockwise quantizer, QOperator format, MatMul weights only): each MatMul becomes a
MatMulNBits node whose weights are lazy tensors, quantized by the same MLAS kernel when
`ir.save` writes them, one at a time. The files it writes are byte for byte the stock
builder's (tests/integration/test_build_stream.py). Any other recipe runs the stock code.

Usage: `python -m builder.build.streamquant ARGS`, with the ORT builder's own ARGS.
"""

from __future__ import annotations

import ctypes
import os
import re
import runpy
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

_ORT_BUILDER = "onnxruntime_genai.models.builder"
_CONTRIB_DOMAIN = "com.microsoft"


def can_stream(model: Any) -> bool:  # an onnxruntime_genai Model (builders/base.py)
    """Whether the streaming pass gives what the stock `to_nbits` gives for this build."""
    quant = model.quant_attrs
    graph = model.model.graph
    if (getattr(model, "exact_quant_override_names", None) or getattr(model, "exact_quant_overrides", None)
            or getattr(model, "int4_customized_weight_config", None)
            or getattr(model, "quantization_algo", "default") != "default"
            or quant["use_qdq"] or quant["bits"] not in (4, 8)
            or set(quant["op_types_to_quantize"]) != {"MatMul"}
            or (model.ep == "cuda" and model.matmul_attrs.get("weights_prepacked", 0) > 0)):
        return False
    uses: dict[str, int] = {}
    for node in graph:
        if not _keeps_subgraphs_as_they_are(node):
            return False
        for value in node.inputs:
            if value is not None and value.name in graph.initializers:
                uses[value.name] = uses.get(value.name, 0) + 1
    # A weight shared by two MatMuls would be quantized twice under one name by the stock pass.
    return _has_float_weights(model) and all(uses.get(node.inputs[1].name, 0) == 1
                                             for node in graph if _is_quantizable(model, node))


def _keeps_subgraphs_as_they_are(node: Any) -> bool:
    """The stock pass re-makes a node that holds subgraphs (Phi-3's long/short rope `If`) with
    `onnx.helper.make_node`: the same node with its attributes in name order (`_sort_attributes`)
    when its domain is the default and nothing inside is quantized or unused. Anything else: the
    stock pass runs."""
    subgraphs = _subgraphs(node)
    if not subgraphs:
        return True
    return (node.domain == ""
            and all(not graph.initializers and all(inner.op_type != "MatMul" and _keeps_subgraphs_as_they_are(inner)
                                                   for inner in graph) for graph in subgraphs))


def _subgraphs(node: Any) -> list[Any]:
    return [graph for attr in node.attributes.values() if attr.type.name in ("GRAPH", "GRAPHS")
            for graph in (attr.value if attr.type.name == "GRAPHS" else [attr.value])]


def _sort_attributes(node: Any) -> None:
    ordered = sorted(node.attributes.items())
    node.attributes.clear()
    node.attributes.update(ordered)


def _is_quantizable(model: Any, node: Any) -> bool:
    """What MatMulNBitsQuantizer's DEFAULT pass rewrites: a MatMul not excluded whose B is a 2-D
    constant initializer."""
    if node.op_type != "MatMul" or node.domain != "" or node.name in model.quant_attrs["nodes_to_exclude"]:
        return False
    weight = node.inputs[1]
    return (weight is not None and weight.const_value is not None
            and weight.name in model.model.graph.initializers and len(weight.const_value.shape) == 2)


def _has_float_weights(model: Any) -> bool:
    """MLAS quantizes fp32 and fp16 (bf16 through fp32); the scales keep the weight's type."""
    import onnx_ir as ir

    floats = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
    return all(node.inputs[1].const_value.dtype in floats for node in model.model.graph if _is_quantizable(model, node))


class _QuantizedWeight:
    """One weight's MLAS blockwise quantization, made when the first of its tensors is written.
    Once all of them are, the quantized arrays are let go and the source's mapped pages given back
    (`release_source_pages`; the source tensor itself stays referenced by the loaded HF model)."""

    def __init__(self, source: Any, bits: int, block_size: int, is_symmetric: bool, parts: set[str]) -> None:
        self._source, self._bits, self._block_size, self._is_symmetric = source, bits, block_size, is_symmetric
        self._wanted = parts
        self._parts: dict[str, np.ndarray] | None = None
        self._taken: set[str] = set()

    def take(self, part: str) -> np.ndarray:
        if self._parts is None:
            if self._source is None:
                raise RuntimeError("a quantized weight was read again after it was written: the streaming pass "
                                   "assumes ir.save reads each tensor once (builder.build.streamquant)")
            self._parts = self._quantize()
        value = self._parts[part]
        self._taken.add(part)
        if self._taken >= self._wanted:
            self._parts, self._source = None, None
            release_source_pages()
        return value

    def _quantize(self) -> dict[str, np.ndarray]:
        import ml_dtypes
        from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

        weight = self._source.numpy()
        is_bfloat16 = weight.dtype == ml_dtypes.bfloat16
        if is_bfloat16:
            weight = weight.astype(np.float32)
        rows, cols = weight.shape
        k_blocks = (rows + self._block_size - 1) // self._block_size
        kpack = 8 // self._bits
        blob_size = (self._block_size + kpack - 1) // kpack
        if k_blocks * self._block_size > rows:
            weight = np.pad(weight, ((0, k_blocks * self._block_size - rows), (0, 0)), "constant")
        weight = np.ascontiguousarray(weight)
        packed = np.zeros((cols, k_blocks, blob_size), dtype="uint8")
        zero_points = np.zeros((cols, (k_blocks + kpack - 1) // kpack), dtype="uint8")
        scales = np.zeros((cols, k_blocks), dtype=weight.dtype)
        quantize = quantize_matmul_8bits if self._bits == 8 else quantize_matmul_4bits
        quantize(packed, weight, scales, zero_points, self._block_size, cols, rows, self._is_symmetric)
        if is_bfloat16:
            scales = scales.astype(ml_dtypes.bfloat16)
        return {"packed": packed, "scales": scales, "zero_points": zero_points}


# The source model's folder (the builder's -i): its safetensors are mapped into this process.
_source_dir: str | None = None
_MADV_DONTNEED = 4  # Linux
_MAPPING_HEADER = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")  # a /proc/self/smaps line that starts a mapping


def release_source_pages() -> None:
    """Give back the resident pages of the source's safetensors mappings that hold no written
    (copy-on-write) page: transformers maps the files and the weights are read from there, so every
    weight read so far stays resident (half the Phi-3.5-mini peak). Unwritten pages of a file
    mapping are the file's own bytes: dropped, they are read again from the page cache if touched.
    A mapping with any written page is left alone (dropping it would undo the write)."""
    if _source_dir is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    mapping: tuple[int, int] | None = None
    try:
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                fields = line.split()
                if _MAPPING_HEADER.match(line):
                    path = fields[5] if len(fields) > 5 else ""
                    is_source = path.startswith(_source_dir) and path.endswith(".safetensors")
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    mapping = (start, end) if is_source else None
                elif mapping is not None and fields[0] == "Anonymous:":
                    if fields[1] == "0":
                        libc.madvise(ctypes.c_void_p(mapping[0]), ctypes.c_size_t(mapping[1] - mapping[0]),
                                     _MADV_DONTNEED)
                    mapping = None
    except OSError:
        return



def _lazy(name: str, quantized: _QuantizedWeight, part: str, dtype: Any, shape: tuple[int, ...]) -> Any:
    import onnx_ir as ir

    return ir.LazyTensor(lambda: ir.Tensor(quantized.take(part), name=name), dtype=dtype, shape=ir.Shape(shape),
                         name=name)


def stream_nbits(model: Any) -> Any:
    """The stock `to_nbits` result, with each quantized weight a lazy tensor (see the module doc)."""
    import onnx_ir as ir

    quant = model.quant_attrs
    bits, block_size, is_symmetric = quant["bits"], quant["matmul_block_size"], quant["is_symmetric"]
    graph = model.model.graph
    model.model.opset_imports[_CONTRIB_DOMAIN] = 1
    for node in list(graph):
        if _subgraphs(node):
            _sort_attributes(node)
        if not _is_quantizable(model, node):
            continue
        activation, weight = node.inputs[0], node.inputs[1]
        rows, cols = weight.const_value.shape
        k_blocks = (rows + block_size - 1) // block_size
        blob_size = (block_size + 8 // bits - 1) // (8 // bits)
        parts = [(f"_Q{bits}", "packed", ir.DataType.UINT8, (cols, k_blocks, blob_size)),
                 ("_scales", "scales", weight.const_value.dtype, (cols, k_blocks))]
        if not is_symmetric:
            parts.append(("_zero_points", "zero_points", ir.DataType.UINT8,
                          (cols, (k_blocks + 8 // bits - 1) // (8 // bits))))
        quantized = _QuantizedWeight(weight.const_value, bits, block_size, is_symmetric, {p[1] for p in parts})
        inputs = [activation]
        for suffix, part, dtype, shape in parts:
            name = weight.name + suffix
            value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape),
                             const_value=_lazy(name, quantized, part, dtype, shape))
            graph.register_initializer(value)
            inputs.append(value)
        # onnx.helper.make_node orders attributes by name; so does this, for the same bytes.
        attributes = {"K": rows, "N": cols}
        if quant["accuracy_level"]:
            attributes["accuracy_level"] = quant["accuracy_level"]
        attributes |= {"bits": bits, "block_size": block_size}
        replacement = ir.Node(_CONTRIB_DOMAIN, "MatMulNBits", inputs,
                              [ir.Attr(k, ir.AttributeType.INT, v) for k, v in attributes.items()],
                              num_outputs=1, name=f"{node.name}_Q{bits}" if node.name else "")
        old_output, new_output = node.outputs[0], replacement.outputs[0]
        new_output.type, new_output.shape = old_output.type, old_output.shape
        ir.convenience.replace_nodes_and_values(graph, node, [node], [replacement], [old_output], [new_output])
    _drop_unused_initializers(graph)
    return model.model


def _drop_unused_initializers(graph: Any) -> None:
    """What onnxruntime's `clean_initializers` does after its pass: every initializer no node or
    graph output reads goes."""
    used = {value.name for node in graph for value in node.inputs if value is not None}
    used |= {value.name for value in graph.outputs}
    for name in [name for name in graph.initializers if name not in used]:
        graph.initializers.pop(name)


def _patched(original: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def to_nbits(self: Any) -> Any:
        if can_stream(self):
            print("edgefleet: quantizing weight by weight while saving (builder.build.streamquant)")
            return stream_nbits(self)
        return original(self)
    return to_nbits


def main() -> None:
    import importlib

    global _source_dir
    for flag in ("-i", "--input"):
        if flag in sys.argv[:-1]:
            _source_dir = os.path.realpath(sys.argv[sys.argv.index(flag) + 1])

    import onnxruntime_genai.models  # noqa: F401  (puts the builder's folder on sys.path)

    # The builder imports its classes as the top-level package `builders`, not through
    # onnxruntime_genai.models: that module's Model is the one to patch.
    model_class = importlib.import_module("builders.base").Model
    model_class.to_nbits = _patched(model_class.to_nbits)
    runpy.run_module(_ORT_BUILDER, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
