"""What a model dir makes onnxruntime open, checked before the load: paths that leave the dir,
custom operator libraries and profiling are refused, a normal model passes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import TensorProto, helper

from agent.wire.errors import ActivationError
from agent.wire.loadcheck import check_model_dir, external_data_locations


def _model_dir(tmp_path: Path, *, location: str = "model.onnx.data", decoder: dict[str, Any] | None = None) -> Path:
    """A model dir with a genai_config.json and an ONNX graph whose one weight lives in external data."""
    root = tmp_path / "model"
    root.mkdir()
    weight = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "8")):
        weight.external_data.add(key=key, value=value)
    # The weight is an initializer of a subgraph: the walker must follow node attributes down.
    then = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "then",
                             [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], initializer=[weight])
    node = helper.make_node("If", ["c"], ["out"], then_branch=then, else_branch=then)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2])], initializer=[])
    (root / "model.onnx").write_bytes(helper.make_model(graph).SerializeToString())
    (root / "model.onnx.data").write_bytes(b"\0" * 8)
    config = {"model": {"decoder": {"filename": "model.onnx", "session_options": {}, **(decoder or {})}}}
    (root / "genai_config.json").write_text(json.dumps(config))
    return root


def test_a_model_that_stays_in_its_dir_passes(tmp_path: Path) -> None:
    root = _model_dir(tmp_path)
    assert external_data_locations(root / "model.onnx") == {"model.onnx.data"}
    check_model_dir(root)


@pytest.mark.parametrize(("decoder", "reason"), [
    ({"filename": "../outside.onnx"}, "not a path inside the model dir"),
    ({"filename": "/etc/passwd"}, "not a path inside the model dir"),
    ({"filename": "missing.onnx"}, "not a regular file inside the model dir"),
    ({"session_options": {"custom_ops_library": "/tmp/evil.so"}}, "custom operator library"),
    ({"session_options": {"enable_profiling": "/var/tmp/prof"}}, "profiling"),
    ({"filename": 7}, "not a file name"),
])
def test_a_config_that_points_outside_or_loads_native_code_is_refused(tmp_path: Path, decoder: dict[str, Any],
                                                                       reason: str) -> None:
    with pytest.raises(ActivationError, match=reason):
        check_model_dir(_model_dir(tmp_path, decoder=decoder))


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/shadow", "a/../../b", "link.bin"])
def test_external_data_outside_the_dir_is_refused(tmp_path: Path, location: str) -> None:
    root = _model_dir(tmp_path, location=location)
    (tmp_path / "secret.bin").write_bytes(b"s" * 8)
    os.symlink(tmp_path / "secret.bin", root / "link.bin")  # inside by name, outside in fact
    with pytest.raises(ActivationError, match="external data location"):
        check_model_dir(root)


def test_a_custom_op_library_inside_the_dir_loads_only_when_allowed(tmp_path: Path) -> None:
    root = _model_dir(tmp_path, decoder={"session_options": {"custom_ops_library": "ops.so"}})
    (root / "ops.so").write_bytes(b"\x7fELF")
    with pytest.raises(ActivationError, match="allow_custom_ops"):
        check_model_dir(root)
    check_model_dir(root, allow_custom_ops=True)


def test_a_file_that_is_not_onnx_is_refused(tmp_path: Path) -> None:
    root = _model_dir(tmp_path)
    (root / "model.onnx").write_bytes(b"\xff" * 64)
    with pytest.raises(ActivationError, match="not a valid ONNX model"):
        check_model_dir(root)
    assert onnx  # the graphs above are real ONNX, built with the onnx package
