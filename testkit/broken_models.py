"""Broken copies of a real model dir, one way each (tests and bench/canary.py use them).

Each function damages the model dir it is given, in place: copy the artifact first.
"""

from __future__ import annotations

import json
from pathlib import Path


def weight_tensors(model_dir: Path) -> list[tuple[str, int, int]]:
    """(name, offset, length) of every weight stored in model.onnx.data."""
    import onnx

    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    out = []
    for init in model.graph.initializer:
        ext = {e.key: e.value for e in init.external_data}
        if ext.get("location") == "model.onnx.data":
            out.append((init.name, int(ext["offset"]), int(ext["length"])))
    return out


def damage_weights(model_dir: Path) -> None:
    name, offset, length = next(i for i in weight_tensors(model_dir) if "layers.5" in i[0] and i[2] > 100_000)
    with open(model_dir / "model.onnx.data", "r+b") as f:
        f.seek(offset + length // 4)
        f.write(bytes(range(256)) * (length // 2 // 256))


def swap_tensors(model_dir: Path) -> None:
    inits = {name: (offset, length) for name, offset, length in weight_tensors(model_dir)}
    a = next(n for n, (_, length) in inits.items() if "layers.3." in n and length > 100_000)
    b = a.replace("layers.3.", "layers.4.")
    assert inits[a][1] == inits[b][1], "the two tensors must have the same size"
    with open(model_dir / "model.onnx.data", "r+b") as f:
        blobs = []
        for name in (a, b):
            f.seek(inits[name][0])
            blobs.append(f.read(inits[name][1]))
        for name, blob in zip((a, b), reversed(blobs), strict=True):
            f.seek(inits[name][0])
            f.write(blob)


def truncate_tensor_file(model_dir: Path) -> None:
    data = model_dir / "model.onnx.data"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)


def swap_past_key_value_inputs(model_dir: Path) -> None:
    """The past keys fed in as values and the values as keys: it loads and runs, and says nonsense."""
    path = model_dir / "genai_config.json"
    config = json.loads(path.read_text())
    inputs = config["model"]["decoder"]["inputs"]
    inputs["past_key_names"], inputs["past_value_names"] = inputs["past_value_names"], inputs["past_key_names"]
    path.write_text(json.dumps(config, indent=4))
