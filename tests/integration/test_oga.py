"""agent.serving.oga (the C API through ctypes) against the official `onnxruntime_genai` module on
the real SmolLM2 INT4 build: same tokens, text, chat template and generations."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent.serving import oga
from agent.wire.errors import OgaError

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def ours(smollm2_int4_raw: Path) -> tuple[oga.Model, oga.Tokenizer]:
    threads = {"model": {"decoder": {"session_options": {"intra_op_num_threads": 2}}}}
    model = oga.Model(smollm2_int4_raw, overlay=threads)
    return model, oga.Tokenizer(model)


@pytest.fixture(scope="module")
def official(smollm2_int4_raw: Path) -> tuple[Any, Any]:
    import onnxruntime_genai as og

    model = og.Model(str(smollm2_int4_raw))
    return model, og.Tokenizer(model)


def _ours_generate(model: oga.Model, ids: list[int], search: dict[str, Any],
                   guidance: tuple[str, str] | None = None) -> list[int]:
    generator = oga.Generator(model, search, guidance)
    generator.append_tokens(ids)
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(generator.next_token())
    # The EOS that ends a run is reported as the next token but not appended to the sequence (0.18).
    assert generator.sequence(0) in (ids + out, ids + out[:-1])
    generator.close()
    return out


def _official_generate(model: Any, ids: list[int], search: dict[str, Any],
                       guidance: tuple[str, str] | None = None) -> list[int]:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(**search)
    if guidance is not None:
        params.set_guidance(*guidance, enable_ff_tokens=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


def test_tokenizer_matches_the_official_module(ours: tuple[oga.Model, oga.Tokenizer],
                                               official: tuple[Any, Any]) -> None:
    tokenizer, reference = ours[1], official[1]
    for text in (PROMPT, "naïve café — 東京 🚀", "", " leading and  double  spaces\n"):
        ids = tokenizer.encode(text)
        assert ids == [int(t) for t in reference.encode(text)]
        assert tokenizer.decode(ids) == reference.decode(ids)
    assert tokenizer.eos_token_ids == [int(t) for t in reference.eos_token_ids]
    messages = json.dumps([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert tokenizer.apply_chat_template(messages) == reference.apply_chat_template(messages,
                                                                                    add_generation_prompt=True)
    stream, reference_stream = tokenizer.create_stream(), reference.create_stream()
    ids = tokenizer.encode("naïve café — 東京 🚀")
    assert "".join(stream.decode(t) for t in ids) == "".join(reference_stream.decode(t) for t in ids)


@pytest.mark.parametrize("search", [
    {"max_length": 20, "do_sample": False},
    {"max_length": 24, "do_sample": True, "temperature": 0.8, "top_k": 40, "top_p": 0.9, "random_seed": 7},
    {"max_length": 20, "do_sample": False, "repetition_penalty": 1.3},
], ids=["greedy", "seeded-sampling", "repetition-penalty"])
def test_generations_match_the_official_module(ours: tuple[oga.Model, oga.Tokenizer], official: tuple[Any, Any],
                                               search: dict[str, Any]) -> None:
    ids = ours[1].encode(PROMPT)
    expected = _official_generate(official[0], ids, search)
    assert len(expected) == search["max_length"] - len(ids)
    assert _ours_generate(ours[0], ids, search) == expected


@pytest.mark.parametrize("guidance", [
    ("json_schema", json.dumps({"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                                "required": ["city"], "additionalProperties": False})),
    ("regex", r"(Paris|Lyon)\. [A-Z][a-z]{2,9}\."),
    ("lark_grammar", 'start: "a city, " WORD\nWORD: /[a-z]{3,8}/'),
], ids=["json_schema", "regex", "lark_grammar"])
def test_guided_generations_match_the_official_module(ours: tuple[oga.Model, oga.Tokenizer],
                                                      official: tuple[Any, Any], guidance: tuple[str, str]) -> None:
    """OgaGeneratorParamsSetGuidance gained an argument in place once (enable_ff_tokens): the binding
    must pass what 0.18 reads, so greedy and sampled constrained runs give the official module's tokens."""
    ids = ours[1].encode(PROMPT)
    for search in ({"max_length": 60, "do_sample": False},
                   {"max_length": 60, "do_sample": True, "temperature": 1.0, "random_seed": 11}):
        expected = _official_generate(official[0], ids, search, guidance)
        assert expected and expected[-1] in ours[1].eos_token_ids  # the constraint ended the answer
        assert _ours_generate(ours[0], ids, search, guidance) == expected
    unconstrained = _ours_generate(ours[0], ids, {"max_length": 60, "do_sample": False})
    assert unconstrained != _ours_generate(ours[0], ids, {"max_length": 60, "do_sample": False}, guidance)


def test_beam_search_sequence_matches(ours: tuple[oga.Model, oga.Tokenizer], official: tuple[Any, Any]) -> None:
    import onnxruntime_genai as og

    ids = ours[1].encode(PROMPT)
    search = {"max_length": 20, "num_beams": 3, "do_sample": False, "num_return_sequences": 1, "early_stopping": True}
    generator = oga.Generator(ours[0], search)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    params = og.GeneratorParams(official[0])
    params.set_search_options(**search)
    reference = og.Generator(official[0], params)
    reference.append_tokens(ids)
    while not reference.is_done():
        reference.generate_next_token()
    assert generator.sequence(0) == [int(t) for t in reference.get_sequence(0)]
    assert generator.sequence(0)[:len(ids)] == ids


def test_errors_carry_the_library_message(ours: tuple[oga.Model, oga.Tokenizer], tmp_path: Path) -> None:
    with pytest.raises(OgaError, match="genai_config.json"):
        oga.Model(tmp_path)
    with pytest.raises(OgaError, match="no_such_option"):
        oga.Generator(ours[0], {"no_such_option": 1})
    generator = oga.Generator(ours[0], {"max_length": 8})
    generator.close()
    generator.close()  # closing twice is harmless
    with pytest.raises(OgaError, match="Generator is closed"):
        generator.is_done()


def test_a_step_releases_the_gil(ours: tuple[oga.Model, oga.Tokenizer]) -> None:
    """Another Python thread runs while the C library computes (the official module holds
    the GIL for the whole step): a long prefill is one C call with no bytecode in it."""
    model, tokenizer = ours
    ids = tokenizer.encode("word " * 1500)
    generator = oga.Generator(model, {"max_length": len(ids) + 1})
    ticks: list[float] = []
    stop = threading.Event()

    def tick() -> None:
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.002)

    thread = threading.Thread(target=tick)
    thread.start()
    try:
        time.sleep(0.02)
        started = time.perf_counter()
        generator.append_tokens(ids)  # the prefill: one C call
        ended = time.perf_counter()
    finally:
        stop.set()
        thread.join()
    inside = [t for t in ticks if started < t < ended]
    assert ended - started > 0.05, "the prefill was too short to tell"
    assert len(inside) >= 5, f"{len(inside)} ticks during a {ended - started:.3f} s step"
