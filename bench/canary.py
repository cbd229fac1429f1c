"""Benchmark: how far each canary lead moves, for a good model on another CPU and for broken models.

One artifact (default: SmolLM2-135M INT4 block 32, built into the cache), its canary replayed
teacher forced and compared with the leads its manifest recorded on the build host:

- this host again (baseline: the rule's noise floor here),
- aarch64: the same files in a Debian arm64 root under qemu-user (ARM kernels, real numerics),
- the same source built with --block-size 128 (other weights, same tokenizer),
- broken copies: damaged weights, two tensors swapped, past keys and values exchanged in
  genai_config.json (testkit.broken_models).

Printed side by side: the largest lead change, its RMS over the positions, the verdict under
`agent.wire.canary.LEAD_TOLERANCE`, and whether an exact-token canary would have passed.

    sudo python bench/canary.py [--cache-dir DIR]     (root: the aarch64 sandbox uses chroot)
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import math
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.serving.runtime import ModelRuntime  # noqa: E402
from agent.wire.canary import LEAD_TOLERANCE, judge_leads  # noqa: E402
from agent.wire.manifest import MANIFEST_FILENAME, Manifest  # noqa: E402
from builder.build.pipeline import BuildRequest, build_artifact, default_cache_dir  # noqa: E402
from builder.build.sandbox import Arm64Sandbox  # noqa: E402
from testkit.broken_models import damage_weights, swap_past_key_value_inputs, swap_tensors  # noqa: E402


def _build(cache_dir: Path, out: Path, block_size: int) -> Path:
    if not (out / MANIFEST_FILENAME).is_file():
        # Block 128 fails the default quality gate (1.74x); here it only stands for other weights.
        build_artifact(BuildRequest(source="smollm2-135m", out_dir=out, block_size=block_size, context_length=2048,
                                    cache_dir=cache_dir, max_ppl_ratio=3.0))
    return out


def _row(name: str, expected: list[float], leads: list[float], exact_ok: bool) -> None:
    changes = [d - e for d, e in zip(leads, expected, strict=True)]
    worst = max(changes, key=abs)
    rms = math.sqrt(sum(c * c for c in changes) / len(changes))
    verdict = judge_leads(expected, leads)
    print(f"| {name} | {worst:+.3f} | {rms:.3f} | {'pass' if verdict.passed else 'REFUSED'} | "
          f"{'pass' if exact_ok else 'refused'} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    args = parser.parse_args()
    cache: Path = args.cache_dir
    work = Path(tempfile.mkdtemp(prefix="bench-canary-"))
    base = _build(cache, cache / "bench" / "smollm2-int4-b32", 32)
    other = _build(cache, cache / "bench" / "smollm2-int4-b128", 128)
    canary = Manifest.model_validate_json((base / MANIFEST_FILENAME).read_bytes()).evaluation.canary
    assert canary.expected_leads is not None, "rebuild the artifact: its manifest has no leads"
    expected = canary.expected_leads

    def here(model_dir: Path) -> tuple[list[float], bool]:
        runtime = ModelRuntime(model_dir, intra_op_num_threads=2)
        leads = runtime.teacher_forced_leads(canary.prompt, canary.expected_token_ids)
        return leads, runtime.greedy_token_ids(canary.prompt, canary.max_new_tokens) == canary.expected_token_ids

    def broken(make: Callable[[Path], None]) -> tuple[list[float], bool]:
        copy = work / make.__name__
        shutil.copytree(base, copy)
        make(copy)
        return here(copy)

    sandbox = Arm64Sandbox(cache)
    sandbox.ensure()
    try:
        arm_leads = sandbox.canary_leads(base, canary.prompt, canary.expected_token_ids)
    finally:
        sandbox.unmount()
    arm_exact = all(lead > 0 for lead in arm_leads)  # every recorded token still the greedy choice

    print(f"python {platform.python_version()}, onnxruntime-genai {md.version('onnxruntime-genai')}, "
          f"host {platform.machine()}, {len(expected)} canary tokens, tolerance {LEAD_TOLERANCE} logits")
    print("| model and CPU | largest lead change (logits) | RMS change | lead rule | exact tokens |")
    print("| --- | --- | --- | --- | --- |")
    leads, exact = here(base)
    _row(f"as built, this host ({platform.machine()})", expected, leads, exact)
    _row("as built, aarch64 (qemu-user)", expected, arm_leads, arm_exact)
    leads, exact = here(other)
    _row("block 128 instead of 32 (other weights)", expected, leads, exact)
    for make in (damage_weights, swap_tensors, swap_past_key_value_inputs):
        leads, exact = broken(make)
        _row(make.__name__.replace("_", " "), expected, leads, exact)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
