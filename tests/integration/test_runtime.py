"""The runtime in-process on the real SmolLM2 INT4 build: options, stops, context checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from agent.serving.generation import stop_split
from agent.serving.identity import read_identity
from agent.serving.runtime import ModelRuntime
from agent.wire.errors import ActivationError, ContextLengthError
from agent.wire.worker import ChatMessage, SamplingOptions


@pytest.mark.parametrize(("text", "stops", "expected"), [
    ("hello world", [], (11, False)),
    ("hello world", ["wor"], (6, True)),
    ("hello wo", ["world"], (6, False)),       # "wo" might become "world": held back
    ("hello w", ["xyz", "wa"], (6, False)),
    ("hello", ["lo", "hel"], (0, True)),       # earliest match wins
    ("abc", ["c"], (2, True)),
    ("abc", ["cd"], (2, False)),
])
def test_stop_split(text: str, stops: list[str], expected: tuple[int, bool]) -> None:
    assert stop_split(text, stops) == expected


@pytest.fixture(scope="module")
def runtime(smollm2_int4_raw: Path) -> ModelRuntime:
    return ModelRuntime(smollm2_int4_raw, intra_op_num_threads=2)


def _text(runtime: ModelRuntime, prompt: str, **options: object) -> str:
    steps = runtime.generate(runtime.encode(prompt), SamplingOptions(**options))  # type: ignore[arg-type]
    return "".join(s.text for s in steps)


def test_greedy_token_ids_are_deterministic_and_bounded(runtime: ModelRuntime) -> None:
    ids = runtime.greedy_token_ids("The capital of France is", 12)
    assert len(ids) == 12
    assert ids == runtime.greedy_token_ids("The capital of France is", 12)
    assert runtime.decode(ids) == _text(runtime, "The capital of France is", temperature=0.0, max_tokens=12)


def test_chat_template_is_the_models(runtime: ModelRuntime) -> None:
    text = runtime.apply_chat_template([ChatMessage(role="user", content="Hi there")])
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")


def test_seeded_sampling_is_reproducible_and_seeds_differ(runtime: ModelRuntime) -> None:
    a = _text(runtime, "Once upon a time", temperature=1.0, seed=7, max_tokens=24)
    b = _text(runtime, "Once upon a time", temperature=1.0, seed=7, max_tokens=24)
    c = _text(runtime, "Once upon a time", temperature=1.0, seed=8, max_tokens=24)
    assert a == b
    assert a != c


def test_top_k_one_is_greedy(runtime: ModelRuntime) -> None:
    greedy = _text(runtime, "Once upon a time", temperature=0.0, max_tokens=16)
    assert _text(runtime, "Once upon a time", temperature=1.5, top_k=1, seed=3, max_tokens=16) == greedy


def test_repetition_penalty_changes_greedy_output(runtime: ModelRuntime) -> None:
    plain = _text(runtime, "The capital of France is", temperature=0.0, max_tokens=24)
    penalized = _text(runtime, "The capital of France is", temperature=0.0, max_tokens=24, repetition_penalty=1.8)
    assert plain != penalized


def test_stop_sequence_cuts_before_the_stop(runtime: ModelRuntime) -> None:
    full = _text(runtime, "The capital of France is", temperature=0.0, max_tokens=24)
    stop = full.split()[3]  # a word from inside the greedy answer
    generation = runtime.start(runtime.encode("The capital of France is"),
                               SamplingOptions(temperature=0.0, max_tokens=24, stop=[stop]))
    text = ""
    while not generation.is_done:
        text += generation.step().text
    assert text == full[:full.index(stop)]
    assert generation.finish_reason == "stop"


def test_max_tokens_bounds_and_reports_length(runtime: ModelRuntime) -> None:
    generation = runtime.start(runtime.encode("Once upon a time"), SamplingOptions(temperature=0.0, max_tokens=5))
    while not generation.is_done:
        generation.step()
    assert len(generation.completion_ids) == 5
    assert generation.finish_reason == "length"


def test_beam_search_runs_and_differs_from_greedy(runtime: ModelRuntime) -> None:
    greedy = _text(runtime, "The capital of France is", temperature=0.0, max_tokens=16)
    beams = _text(runtime, "The capital of France is", num_beams=3, max_tokens=16)
    assert beams and beams != greedy


def test_context_length_check_names_the_numbers(runtime: ModelRuntime) -> None:
    with pytest.raises(ContextLengthError, match="8192 tokens.*9000 tokens"):
        runtime.start(list(range(100, 9100)), SamplingOptions())
    with pytest.raises(ContextLengthError, match=r"8200 tokens \(8000 in the prompt, 200 in max_tokens\)"):
        runtime.start(list(range(100, 8100)), SamplingOptions(max_tokens=200))


def test_identity_from_dir_name_and_manifest(smollm2_int4_raw: Path, tmp_path: Path) -> None:
    identity = read_identity(smollm2_int4_raw)
    assert (identity.name, identity.version, identity.context_length) == (smollm2_int4_raw.name, None, 8192)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "genai_config.json").write_text("{not json")
    with pytest.raises(ActivationError, match="genai_config.json"):
        read_identity(broken)
    # An invalid manifest is ignored with a warning, not trusted.
    shutil.copy(smollm2_int4_raw / "genai_config.json", broken / "genai_config.json")
    (broken / "manifest.json").write_text(json.dumps({"name": "evil", "version": 9}))
    assert read_identity(broken).name == "broken"


def test_unloadable_dir_raises_activation_error(tmp_path: Path, smollm2_int4_raw: Path) -> None:
    shutil.copy(smollm2_int4_raw / "genai_config.json", tmp_path / "genai_config.json")
    # The model file is not there: the load check says so before onnxruntime runs.
    with pytest.raises(ActivationError, match="'model.onnx', which is not a regular file inside the model dir"):
        ModelRuntime(tmp_path)
    # Every file the config names is there, the tokenizer is not: onnxruntime-genai refuses.
    for name in ("model.onnx", "model.onnx.data"):
        shutil.copy(smollm2_int4_raw / name, tmp_path / name)
    with pytest.raises(ActivationError, match="cannot load"):
        ModelRuntime(tmp_path)


def test_default_completion_budget_is_capped(runtime: ModelRuntime) -> None:
    from agent.wire.worker import DEFAULT_MAX_NEW_TOKENS

    assert runtime.check_context(10, None) == DEFAULT_MAX_NEW_TOKENS
    assert runtime.check_context(8000, None) == 192  # what is left of the context
    assert runtime.search_options(10, SamplingOptions())["max_length"] == 10 + DEFAULT_MAX_NEW_TOKENS
