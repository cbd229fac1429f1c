"""Which precision / execution provider / profile combinations a build accepts,
and the ORT builder options they turn into. Pure: values in, values out.

Everything here runs before any work starts, so a bad command line costs
nothing and says exactly what to change.
"""

from __future__ import annotations

from agent.wire.base import FrozenModel
from agent.wire.errors import UsageError
from agent.wire.manifest import ExecutionProvider, Precision, Profile

# The combinations onnxruntime-genai 0.18's model builder lists as valid
# (it prints them itself); anything else fails minutes later inside it. Less fp32/cuda:
# 0.18 writes that graph without its KV outputs ("Graph output (present.0.key) does not
# exist"), which no provider loads (measured on SmolLM2 and a tiny llama).
VALID_COMBINATIONS: frozenset[tuple[str, str]] = frozenset({
    ("fp32", "cpu"),
    ("fp16", "cuda"), ("fp16", "dml"),
    ("int8", "cpu"), ("int8", "cuda"), ("int8", "webgpu"),
    ("int4", "cpu"), ("int4", "cuda"), ("int4", "dml"), ("int4", "webgpu"),
})
BLOCK_SIZES: tuple[int, ...] = (16, 32, 64, 128, 256)
ACCURACY_LEVELS: tuple[int, ...] = (1, 2, 3, 4)
ALGOS: tuple[str, ...] = ("default", "rtn", "k_quant", "rtn_last", "k_quant_last", "k_quant_mixed", "k_quant_linear")
WEIGHT_ONLY_PRECISIONS: frozenset[str] = frozenset({"int4", "int8"})

# Defaults for the CPU INT4 build. block_size 32 keeps quality closest to fp32
# (see README "Builder"); accuracy_level 4 (int8 activations) is what makes
# MatMulNBits fast on CPUs with int8 dot-product instructions.
DEFAULT_BLOCK_SIZE = 32
DEFAULT_ACCURACY_LEVEL = 4
# The mobile recipe (README "Builder" explains each choice): block 32 decoded
# fastest and kept quality best in bench/build.py, and is the block width of
# the int8-compute (accuracy_level 4) kernels on ARM64; the context is capped
# because the KV cache is what grows RAM on small boards.
MOBILE_BLOCK_SIZE = 32
MOBILE_ACCURACY_LEVEL = 4
MOBILE_MAX_CONTEXT_LENGTH = 2048

# Keys the dedicated flags own: passing them through --extra-option too would
# leave two answers to one question.
_FLAG_KEYS = {"block_size": "--block-size", "accuracy_level": "--accuracy-level", "algo_config": "--algo",
              "int4_block_size": "--block-size", "int4_accuracy_level": "--accuracy-level",
              "int4_algo_config": "--algo"}


class BuildOptions(FrozenModel):
    """A validated build recipe: what the ORT builder is asked to do."""

    precision: Precision
    execution_provider: ExecutionProvider
    profile: Profile
    ort_extra_options: dict[str, str]


def parse_extra_options(items: list[str]) -> dict[str, str]:
    """`KEY=VALUE` strings to a dict.

    Raises:
        UsageError: an item has no `=`, an empty key, a repeated key, or a key a dedicated flag owns.
    """
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--extra-option {item!r} must look like KEY=VALUE,"
                             " e.g. --extra-option shared_embeddings=true")
        if key in _FLAG_KEYS:
            raise UsageError(f"--extra-option {key}=... is set with {_FLAG_KEYS[key]}; use that flag instead")
        if key in out:
            raise UsageError(f"--extra-option {key} given twice ({out[key]!r} and {value!r}); keep one")
        out[key] = value
    return out


def resolve_build_options(
    *,
    precision: str,
    execution_provider: str,
    profile: str | None,
    block_size: int | None = None,
    accuracy_level: int | None = None,
    algo: str | None = None,
    extra_options: dict[str, str] | None = None,
) -> BuildOptions:
    """Check a requested combination and return the recipe for the ORT builder.

    `profile` None means the execution provider's own profile (`cpu` for cpu).
    `mobile` is INT4 on the CPU EP with int8 compute (accuracy_level 4) and
    block size MOBILE_BLOCK_SIZE; explicit flags that contradict it are refused
    rather than silently overridden.

    Raises:
        UsageError: the combination cannot work; the message names the values and a valid alternative.
    """
    if (precision, execution_provider) not in VALID_COMBINATIONS:
        valid = ", ".join(sorted(f"{p}/{e}" for p, e in VALID_COMBINATIONS if e == execution_provider))
        raise UsageError(
            f"precision {precision} is not supported on execution provider {execution_provider}"
            f" (valid there: {valid or 'none'}): pick another -p or -e"
            + ("; onnxruntime-genai 0.18 writes an fp32 CUDA graph no provider loads: use -p fp16 for full"
               " precision on a GPU" if (precision, execution_provider) == ("fp32", "cuda") else "")
        )
    if profile is None:
        profile = execution_provider
    if profile == "mobile":
        if precision != "int4" or execution_provider != "cpu":
            raise UsageError(
                f"--profile mobile is INT4 on the CPU EP, not {precision}/{execution_provider}: "
                "drop -p/-e or use --profile cpu"
            )
        if accuracy_level is not None and accuracy_level != MOBILE_ACCURACY_LEVEL:
            raise UsageError(
                f"--profile mobile uses --accuracy-level {MOBILE_ACCURACY_LEVEL} (int8 compute), not {accuracy_level}: "
                "drop --accuracy-level or use --profile cpu"
            )
        block_size = MOBILE_BLOCK_SIZE if block_size is None else block_size
        accuracy_level = MOBILE_ACCURACY_LEVEL
    elif profile != execution_provider:
        raise UsageError(
            f"--profile {profile} does not fit -e {execution_provider}: "
            f"use --profile {execution_provider} (or mobile with -e cpu -p int4)"
        )

    opts: dict[str, str] = {}
    if precision in WEIGHT_ONLY_PRECISIONS:
        if block_size is not None and block_size not in BLOCK_SIZES:
            raise UsageError(f"--block-size {block_size} is not one of {', '.join(map(str, BLOCK_SIZES))}")
        if accuracy_level is not None and accuracy_level not in ACCURACY_LEVELS:
            raise UsageError(f"--accuracy-level {accuracy_level} is not one of 1 (fp32), 2 (fp16), 3 (bf16), 4 (int8)")
        if algo is not None and algo not in ALGOS:
            raise UsageError(f"--algo {algo!r} is not one of {', '.join(ALGOS)}")
        opts["block_size"] = str(DEFAULT_BLOCK_SIZE if block_size is None else block_size)
        if execution_provider == "cpu" or accuracy_level is not None:
            opts["accuracy_level"] = str(DEFAULT_ACCURACY_LEVEL if accuracy_level is None else accuracy_level)
        if algo is not None:
            opts["algo_config"] = algo
    else:
        given = [flag for flag, v in (("--block-size", block_size), ("--accuracy-level", accuracy_level),
                                      ("--algo", algo)) if v is not None]
        if given:
            raise UsageError(f"{', '.join(given)} only apply to -p int4 or int8, not {precision}: drop them")
    for key, value in (extra_options or {}).items():
        if key in _FLAG_KEYS:
            raise UsageError(f"extra option {key} is set with {_FLAG_KEYS[key]}; use that flag instead")
        opts[key] = value
    return BuildOptions(precision=precision, execution_provider=execution_provider,  # type: ignore[arg-type]
                        profile=profile, ort_extra_options=opts)  # type: ignore[arg-type]
