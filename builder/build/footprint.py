"""Footprint measured, not guessed: peak RSS of a separate process that loads
the model and generates at the declared context length.

A separate process, because the builder's own RSS (torch, the reference model,
logits of the perplexity run) says nothing about what a device needs. The
child fills the KV cache to the declared context length, prompt fed in chunks
of PREFILL_CHUNK_TOKENS (what bounds the attention scratch), then decodes a
few tokens; a model that takes images then prefills the largest image prompt a
request may send. It reports its own high-water mark (VmHWM).

Run as `python -m builder.build.footprint MODEL_DIR CONTEXT_LENGTH` it is that child.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from agent.wire.base import FrozenModel
from agent.wire.errors import BuildError
from agent.wire.genai_config import image_tag, image_tags
from agent.wire.worker import MAX_PROMPT_IMAGES, PREFILL_CHUNK_TOKENS
from builder import IMPORT_ROOT

DECODE_TOKENS = 8
# Margin over the measured peak: the device runs the API server, the agent and
# a second model during a switch window on top of the bare runtime, and RSS
# varies with allocator and thread count. 25% of the peak, at least 128 MiB.
RAM_MARGIN_FRACTION = 0.25
RAM_MARGIN_MIN_BYTES = 128 * 1024 * 1024
# Disk: the files once, plus the same again for staging the next version
# next to it while this one serves.
DISK_FACTOR = 2
PROBE_TIMEOUT_S = 1800


class Footprint(FrozenModel):
    peak_rss_bytes: int
    context_length: int
    min_ram_bytes: int
    ram_margin_bytes: int


def ram_margin_bytes(peak_rss_bytes: int) -> int:
    return max(RAM_MARGIN_MIN_BYTES, int(peak_rss_bytes * RAM_MARGIN_FRACTION))


def min_free_disk_bytes(total_file_bytes: int) -> int:
    return DISK_FACTOR * total_file_bytes


# A GPU build's accelerator memory over its weights and KV cache: the CUDA context, cuBLAS
# workspaces and activations (an estimate: no GPU measures it here; the device's canary does).
# The floor is what a CUDA context alone took on an H200, with room (README "GPU targets").
ACCELERATOR_MARGIN_FRACTION = 0.25
ACCELERATOR_MARGIN_MIN_BYTES = 768 * 1024 * 1024


def accelerator_memory_bytes(artifact: Path, context_length: int) -> int:
    """Accelerator memory a GPU build of `artifact` needs: its ONNX weights, an fp16 KV cache at
    `context_length` (what GPU builds keep), and a margin."""
    from builder.build.evaluate import onnx_weight_bytes

    weights = onnx_weight_bytes(artifact)
    decoder = json.loads((artifact / "genai_config.json").read_text())["model"]["decoder"]
    kv = 2 * decoder["num_hidden_layers"] * decoder["num_key_value_heads"] * decoder["head_size"] * context_length * 2
    needed = weights + kv
    return needed + max(ACCELERATOR_MARGIN_MIN_BYTES, int(needed * ACCELERATOR_MARGIN_FRACTION))


def measure_footprint(model_dir: Path, context_length: int, env: dict[str, str] | None = None) -> Footprint:
    """Run the probe in a child process and turn its peak RSS into min_ram_bytes.

    Raises:
        BuildError: the probe failed; the message ends with its last output lines.
    """
    cmd = [sys.executable, "-m", "builder.build.footprint", str(model_dir), str(context_length)]
    if env is None:
        # The child must import this very builder package, installed or not.
        root = str(IMPORT_ROOT)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, env=env, check=False)
    except subprocess.TimeoutExpired as e:
        raise BuildError(f"footprint probe on {model_dir} ran over {PROBE_TIMEOUT_S} s at context {context_length}: "
                         "declare a shorter --context-length") from e
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise BuildError(f"footprint probe on {model_dir} failed (exit {proc.returncode}): {tail}")
    peak = int(json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_bytes"])
    margin = ram_margin_bytes(peak)
    return Footprint(peak_rss_bytes=peak, context_length=context_length, min_ram_bytes=peak + margin,
                     ram_margin_bytes=margin)


def _probe(model_dir: str, context_length: int) -> dict[str, int]:
    """The peak RSS of a full context of text and, for a model that takes images, of the largest
    image prompt a request may send (with the text-only peak and that prompt's tokens beside it)."""
    import onnxruntime_genai as og

    from builder.build.evaluate import cpu_config

    model = og.Model(cpu_config(model_dir, all_cpus=True))
    vocab = int(json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]["vocab_size"])
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=context_length, do_sample=False)
    gen = og.Generator(model, params)
    decode = min(DECODE_TOKENS, context_length - 1)
    # Any ids do: memory depends on how many tokens are cached, not which.
    ids = [(i * 7919) % (vocab - 3) + 3 for i in range(context_length - decode)]
    for start in range(0, len(ids), PREFILL_CHUNK_TOKENS):
        gen.append_tokens(ids[start:start + PREFILL_CHUNK_TOKENS])
    while not gen.is_done():
        gen.generate_next_token()
    del gen
    figures = {"text_peak_rss_bytes": _peak_rss_bytes()}
    tag = image_tag(Path(model_dir))
    if tag is not None:
        figures["image_prompt_tokens"] = _image_prefill(model, tag, context_length)
    return {"peak_rss_bytes": _peak_rss_bytes(), **figures}


def _image_prefill(model, tag: str, context_length: int) -> int:  # model: og.Model
    """Prefill the largest image prompt a request may send (MAX_PROMPT_IMAGES canary pictures; fewer
    when the context cannot hold them) and decode a token: a vision model's encoder and the pixel
    tensors are part of what a device needs. Returns the prompt's tokens (0: not even one fits)."""
    from builder.build.evaluate import canary_picture, image_generator, image_inputs

    picture = canary_picture()
    for count in range(MAX_PROMPT_IMAGES, 0, -1):
        inputs, tokens = image_inputs(model, image_tags(tag, count) + "Describe these pictures.", [picture] * count)
        if tokens < context_length:
            image_generator(model, inputs, tokens, 1).generate_next_token()
            return tokens
    return 0


def _peak_rss_bytes() -> int:
    """VmHWM of this process image. Not ru_maxrss: Linux carries the parent's
    high-water mark from fork across execve, so a child of a 2 GB builder
    would report 2 GB whatever it used itself."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


if __name__ == "__main__":
    print(json.dumps(_probe(sys.argv[1], int(sys.argv[2]))))
