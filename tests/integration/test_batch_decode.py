"""The worker's batched decode on real SmolLM2 INT4 models (block 32 and block 128): many
requests decode in one run per group of slots, and every answer is the one the request gets
alone, whatever else shares its runs, however many groups there are, and when a group grows
for a long prompt; on block 32, whose kernels compute a row alike in any run, it is also
onnxruntime-genai's own greedy answer; the prefix cache's slots answer as fresh ones; the edited
head computes a prefill's logits as the graph as built does, without a row per prompt token."""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import psutil
import pytest

from agent.serving.batch import GROUP_ROWS, INITIAL_SLOT_TOKENS, BatchDecoder, Slot, StoredKv
from agent.serving.generation import BatchedGeneration, decode_all
from agent.serving.prefix_cache import PrefixCache
from agent.serving.runtime import ModelRuntime
from agent.wire.worker import SamplingOptions

GREEDY = SamplingOptions(temperature=0.0, max_tokens=24)


@pytest.fixture(scope="module", params=["block32", "block128"])
def runtime(request: pytest.FixtureRequest, smollm2_int4_raw: Path, smollm2_int4_b128: Path) -> Iterator[ModelRuntime]:
    model_dir = smollm2_int4_raw if request.param == "block32" else smollm2_int4_b128
    rt = ModelRuntime(model_dir, intra_op_num_threads=2, batch=True)
    yield rt
    rt.close()


def _prompt(rt: ModelRuntime, i: int, words: int = 0) -> list[int]:
    filler = " ".join(["the lighthouse keeper watched the sea"] * words)
    return rt.encode(f"<|im_start|>user\n(request {i}) {filler} Tell me about lighthouses.<|im_end|>\n"
                     "<|im_start|>assistant\n")


def _serve(rt: ModelRuntime, prompts: Sequence[list[int]], options: SamplingOptions = GREEDY,
           cache: PrefixCache | None = None, starts: Sequence[int] = ()) -> list[list[int]]:
    """Every prompt to its end as the worker steps them: one prefill batch of each prefilling request
    and one decode run for all decoding ones per round; request i joins at round starts[i]."""
    joins = list(starts) or [0] * len(prompts)
    generations: dict[int, BatchedGeneration] = {}
    round_ = 0
    while len(generations) < len(prompts) or any(not g.is_done for g in generations.values()):
        for i, p in enumerate(prompts):
            if joins[i] == round_:
                generations[i] = rt.start_batched(p, options, cache)
        decoding = [g for g in generations.values() if g.is_decoding]
        decode_all(decoding)
        for g in generations.values():
            if g not in decoding and not g.is_done:
                g.prefill_step(32 if decoding else 1024)
        round_ += 1
    for g in generations.values():
        g.release()
    return [generations[i].completion_ids for i in range(len(prompts))]


def test_answers_under_load_are_the_answers_alone(runtime: ModelRuntime) -> None:
    prompts = [_prompt(runtime, i) for i in range(GROUP_ROWS + 3)]  # a second group of slots
    alone = [_serve(runtime, [p])[0] for p in prompts]
    assert len({tuple(a) for a in alone}) > 1
    assert _serve(runtime, prompts) == alone
    # Joining and leaving between steps, prompts prefilled in cells beside decoding rows.
    assert _serve(runtime, prompts, starts=[3 * i for i in range(len(prompts))]) == alone
    assert runtime.decoder is not None and len(runtime.decoder.groups) == 2


def test_a_group_grown_for_a_long_prompt_keeps_the_other_slots_kv(runtime: ModelRuntime) -> None:
    short, long = _prompt(runtime, 1), _prompt(runtime, 2, words=90)
    assert len(long) > INITIAL_SLOT_TOKENS
    alone = [_serve(runtime, [short])[0], _serve(runtime, [long])[0]]
    fresh = ModelRuntime(runtime.model_dir, intra_op_num_threads=2, batch=True)  # its group starts small
    try:
        assert fresh.decoder is not None
        assert _serve(fresh, [short, long], starts=[0, 4]) == alone
        assert fresh.decoder.groups[0].room > INITIAL_SLOT_TOKENS
    finally:
        fresh.close()


def test_alone_on_block_32_it_is_onnxruntime_genais_greedy_answer(smollm2_int4_raw: Path) -> None:
    rt = ModelRuntime(smollm2_int4_raw, intra_op_num_threads=2, batch=True)
    try:
        assert rt.decoder is not None and rt.decoder.row_multiple == 1
        for i in range(3):
            prompt = _prompt(rt, i)
            generator_answer = [t for step in rt.generate(prompt, GREEDY) for t in step.token_ids]
            assert _serve(rt, [prompt]) == [generator_answer]
    finally:
        rt.close()


def _peak_rss_growth(action: Callable[[], object]) -> int:
    """How far the process's peak resident memory rose above where it stood while `action` ran."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = psutil.Process().memory_info().rss
    action()
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024 - before


def test_the_edited_head_computes_the_logits_a_prefill_reads_alike_and_only_those(runtime: ModelRuntime) -> None:
    """The decoder graph is edited so that its head computes only the positions whose logits a run
    reads: a prefill's last token's logits are bit for bit the unedited graph's (at prompt lengths
    of either parity: block 128 computes rows in pairs), and its memory holds no row per prompt token."""
    decoder = runtime.decoder
    assert decoder is not None and decoder.selects_positions
    plain = BatchDecoder(decoder.graph, threads=2, edit_head=False)
    try:
        assert not plain.selects_positions and plain.row_multiple == decoder.row_multiple
        prompt = _prompt(runtime, 4, words=70)

        def last_logits(d: BatchDecoder, n: int) -> bytes:
            slot = d.free_slot() or d.add_slots()
            try:
                logits = d.prefill(slot, prompt[:n])
                return ctypes.string_at(logits.address, 4 * logits.vocab)
            finally:
                slot.close()

        for n in (len(prompt), len(prompt) - 1, 37, 2, 1):
            assert last_logits(decoder, n) == last_logits(plain, n), n
        every_row = len(prompt) * decoder.graph.vocab_size * 4
        kv = len(prompt) * decoder.graph.kv_bytes_per_token  # written by both (the slot gave it back before)
        assert every_row > 80 << 20
        assert _peak_rss_growth(lambda: last_logits(plain, len(prompt))) > every_row
        assert _peak_rss_growth(lambda: last_logits(decoder, len(prompt))) < kv + every_row / 4
    finally:
        plain.close()


def test_a_kept_slot_answers_a_follow_up_as_a_fresh_slot_would(runtime: ModelRuntime) -> None:
    cache: PrefixCache = PrefixCache(256 << 20, runtime.kv_bytes_per_token)
    first = _prompt(runtime, 5)
    answer = _serve(runtime, [first], cache=cache)[0]
    assert runtime.decoder is not None and not any(slot.in_use for slot in runtime.decoder.slots)  # KV copied out
    follow_up = first + answer + runtime.encode("<|im_end|>\n<|im_start|>user\nAnd then?<|im_end|>\n"
                                                 "<|im_start|>assistant\n")
    assert cache.has_unsettled  # the completion's KV was decoded, not prefilled
    while cache.has_unsettled:  # recomputed as a prefill computes it, as the idle worker does
        cache.settle_step(32)
    generation = runtime.start_batched(follow_up, GREEDY, cache)
    reused = generation.reused_tokens
    generation.release()
    assert reused > len(first)  # the answer's cells too
    assert _serve(runtime, [follow_up], cache=cache) == _serve(runtime, [follow_up])


def test_sampled_requests_batch_and_a_seed_repeats_its_answer(runtime: ModelRuntime) -> None:
    seeded = SamplingOptions(temperature=0.9, top_p=0.95, seed=7, max_tokens=24)
    prompts = [_prompt(runtime, i) for i in range(4)]
    alone = _serve(runtime, prompts[:1], seeded)[0]
    together = _serve(runtime, prompts, seeded)
    assert together[0] == alone
    greedy = _serve(runtime, prompts[:1])[0]
    assert alone != greedy  # it did sample


def test_a_closed_slot_gives_its_kv_memory_back(smollm2_int4_raw: Path) -> None:
    """Memory follows the tokens held: a long request's KV pages are resident while its slot holds
    them and go back to the system when the slot closes (not kept at the most a slot ever held)."""
    rt = ModelRuntime(smollm2_int4_raw, intra_op_num_threads=2, batch=True)
    try:
        decoder = rt.decoder
        assert decoder is not None
        prompt = _prompt(rt, 3, words=200)
        kv_bytes = len(prompt) * decoder.graph.kv_bytes_per_token
        assert kv_bytes > 40 << 20
        slot = decoder.free_slot() or decoder.add_slots()
        for start in range(0, len(prompt), 512):
            decoder.prefill(slot, prompt[start:start + 512])
        process = psutil.Process()
        holding = process.memory_info().rss
        slot.close()
        released = process.memory_info().rss
        assert holding - released > 0.9 * kv_bytes
    finally:
        rt.close()


def test_a_kept_copys_pages_serve_the_next_copy_and_go_back_when_idle(smollm2_int4_raw: Path) -> None:
    """A finished slot's copy (`StoredKv`) gives its pages to the next copy (no fresh pages to fault in
    between two clients' tokens) and, once the worker is idle (`trim`), back to the system."""
    rt = ModelRuntime(smollm2_int4_raw, intra_op_num_threads=2, batch=True)
    try:
        decoder = rt.decoder
        assert decoder is not None
        prompt = _prompt(rt, 3, words=150)

        def prefilled(tokens: list[int]) -> Slot:
            slot = decoder.free_slot() or decoder.add_slots()
            for start in range(0, len(tokens), 512):
                decoder.prefill(slot, tokens[start:start + 512])
            return slot

        slot = prefilled(prompt)
        kept = StoredKv(decoder, slot)
        slot.close()
        kv_bytes = kept.length * decoder.graph.kv_bytes_per_token
        assert kv_bytes > 20 << 20
        kept.close()  # its pages wait for the next copy
        shorter = prefilled(prompt[:len(prompt) * 3 // 4])
        process = psutil.Process()
        before = process.memory_info().rss
        next_copy = StoredKv(decoder, shorter)
        assert process.memory_info().rss - before < 0.1 * kv_bytes  # written into pages already there
        shorter.close()
        next_copy.close()
        holding = process.memory_info().rss
        decoder.trim()
        assert holding - process.memory_info().rss > 0.9 * kv_bytes
    finally:
        rt.close()
