"""A model dir's decoder graph, as the worker's batched decode (`agent.serving.batch`) runs it:
what `genai_config.json` says of it, and its onnxruntime session, the graph's head edited in
memory where it allows (`onnx_proto.positions_from`) so that a prefill computes only the logits
it reads.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from agent.serving import ort
from agent.serving.onnx_proto import positions_from
from agent.wire.errors import OgaError

log = logging.getLogger(__name__)

# The inputs and outputs a decoder graph may have to be run here (onnxruntime-genai's names for them).
_RUNNABLE_INPUTS = {"input_ids", "attention_mask", "past_key_names", "past_value_names"}
_RUNNABLE_OUTPUTS = {"logits", "present_key_names", "present_value_names"}
# A decoder graph file up to this size keeps its weights in an external data file: it is read whole
# to be edited, and onnxruntime finds the weights through this session option.
_EDITABLE_GRAPH_BYTES = 64 << 20
_EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"
# The input the edit adds: the first sequence position whose logits a run computes.
LOGITS_FROM = "edgefleet_logits_from"


@dataclass(frozen=True)
class DecoderGraph:
    """What `genai_config.json` says of the decoder graph."""

    path: Path
    layers: int
    kv_heads: int
    head_size: int
    vocab_size: int
    context_length: int
    input_ids: str
    attention_mask: str
    past_key: str  # with %d for the layer
    past_value: str
    logits: str
    present_key: str
    present_value: str

    @property
    def kv_bytes_per_token(self) -> int:
        """Keys and values of every layer, float32 (a CPU graph's)."""
        return 2 * self.layers * self.kv_heads * self.head_size * 4

    def kv_names(self, layer: int) -> tuple[tuple[str, str], tuple[str, str]]:
        """(past, present) names of the layer's keys, then of its values."""
        return ((self.past_key % layer, self.present_key % layer),
                (self.past_value % layer, self.present_value % layer))


def read_decoder_graph(model_dir: Path) -> DecoderGraph | str:
    """The decoder graph of a model dir, or why the batched decode cannot run it (then onnxruntime-genai's
    generators serve the model, one request at a time)."""
    try:
        model = json.loads((model_dir / "genai_config.json").read_text())["model"]
        decoder = model["decoder"]
        inputs, outputs = dict(decoder["inputs"]), dict(decoder["outputs"])
        if any(decoder.get("session_options", {}).get("provider_options") or []):
            return "its graph is built for a GPU"
        if set(inputs) - _RUNNABLE_INPUTS or set(outputs) - _RUNNABLE_OUTPUTS:
            return f"its decoder takes {sorted(inputs)} and gives {sorted(outputs)}"
        return DecoderGraph(
            path=model_dir / decoder["filename"], layers=int(decoder["num_hidden_layers"]),
            kv_heads=int(decoder["num_key_value_heads"]), head_size=int(decoder["head_size"]),
            vocab_size=int(model["vocab_size"]), context_length=int(model["context_length"]),
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
            past_key=inputs["past_key_names"], past_value=inputs["past_value_names"], logits=outputs["logits"],
            present_key=outputs["present_key_names"], present_value=outputs["present_value_names"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"its genai_config.json does not describe a decoder ({e})"


def decoder_session(graph: DecoderGraph, threads: int, edit: bool) -> tuple[ort.Session, bool]:
    """The decoder graph's session, and whether its head reads the positions from `LOGITS_FROM` only:
    edited so where the graph allows it (`onnx_proto.positions_from`): a prefill of n tokens then
    computes the rows of logits it reads, not n (the head's share of a prefill, and n rows of memory)."""
    try:
        if not edit:
            reason = "asked to run the graph as it is"
        elif graph.path.stat().st_size <= _EDITABLE_GRAPH_BYTES:
            edited = positions_from(graph.path.read_bytes(), graph.logits, LOGITS_FROM)
            config = [(_EXTERNAL_DATA_FOLDER, str(graph.path.parent))]
            return ort.Session(edited, threads=threads, config=config), True
        else:
            reason = "its graph file holds its weights"
    except (OSError, ValueError, OgaError) as e:
        reason = str(e)
    log.info("event=prefill_logits_all_positions graph=%s reason=%r", graph.path, reason)
    return ort.Session(graph.path, threads=threads), False
