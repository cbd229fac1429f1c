"""The worker's hand-written ONNX protobuf (`agent.serving.onnx_proto`): messages it reads give
back their bytes, and the head edit makes a model compute its output from a position on, with the
numbers of the model as built, checked by onnx and run by onnxruntime."""

from __future__ import annotations

import array

import onnx
import pytest
from onnx import TensorProto, helper

from agent.serving import ort
from agent.serving.onnx_proto import fields, positions_from

HIDDEN, VOCAB, POSITIONS = 8, 12, 5


def _head_model(op: str = "MatMul") -> bytes:
    """A language model's head in miniature: a norm's output (batch, positions, hidden) times a
    weight makes the logits (batch, positions, vocabulary)."""
    weight = helper.make_tensor("weight", TensorProto.FLOAT, [HIDDEN, VOCAB], [i / 7.0 for i in range(HIDDEN * VOCAB)])
    nodes = [helper.make_node("Relu", ["hidden"], ["normed"]),
             helper.make_node(op, ["normed", "weight"], ["logits"])]
    graph = helper.make_graph(nodes, "head",
                              [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])],
                              [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


def _run(model: bytes, start: int | None) -> list[float]:
    session = ort.Session(model, threads=1)
    hidden = array.array("f", [((i * 37) % 11) / 3.0 - 1.0 for i in range(POSITIONS * HIDDEN)])
    rows = POSITIONS - (start or 0)
    out = array.array("f", bytes(4 * rows * VOCAB))
    binding = session.binding()
    binding.bind("hidden", ort.Tensor(hidden, (1, POSITIONS, HIDDEN), ort.FLOAT))
    if start is not None:
        binding.bind("from", ort.Tensor(array.array("q", [start]), (1,), ort.INT64))
    binding.bind("logits", ort.Tensor(out, (1, rows, VOCAB), ort.FLOAT), output=True)
    session.run(binding)
    return list(out)


def test_a_message_read_gives_back_its_bytes() -> None:
    model = _head_model()
    assert b"".join(f.raw for f in fields(model)) == model
    [graph] = [f.value for f in fields(model) if f.number == 7]
    assert isinstance(graph, bytes) and b"".join(f.raw for f in fields(graph)) == graph


@pytest.mark.parametrize("start", [0, 3, POSITIONS - 1])
def test_the_edited_head_computes_the_positions_from_start_as_the_model_as_built(start: int) -> None:
    model = _head_model()
    edited = positions_from(model, "logits", "from")
    onnx.checker.check_model(onnx.load_from_string(edited), full_check=True)
    assert _run(edited, start) == _run(model, None)[start * VOCAB:]


def test_an_output_not_made_by_a_matrix_product_is_left_alone() -> None:
    with pytest.raises(ValueError, match="made by"):
        positions_from(_head_model(), "normed", "from")
    with pytest.raises(ValueError, match="no node makes"):
        positions_from(_head_model(), "nothing", "from")
    with pytest.raises(ValueError):
        fields(b"\x0a\xff")  # a length running past the end
