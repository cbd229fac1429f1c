"""The prefix cache's policy: prefill batches on cell boundaries, the longest exact prefix of whole
cells wins, same search options only, room for the request, the prompt's last token left to
prefill, kept completions settled a cell at a time, the byte budget kept by dropping the least
recently kept."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from agent.serving.prefix_cache import CELL_TOKENS, PrefixCache, batch_end, common_prefix_length

GREEDY = ("greedy",)


class _Holder:
    """Records what the cache does to a generator (the real one: tests/integration/test_api_prefix_cache.py)."""

    def __init__(self, name: str, fail_on_append: bool = False) -> None:
        self.name = name
        self.calls: list[tuple[str, object]] = []
        self.closed = False
        self.fail_on_append = fail_on_append

    def rewind_to(self, length: int) -> None:
        self.calls.append(("rewind", length))

    def append_tokens(self, token_ids: Sequence[int]) -> None:
        if self.fail_on_append:
            raise RuntimeError("onnxruntime-genai failed")
        self.calls.append(("append", list(token_ids)))

    def close(self) -> None:
        self.closed = True


def _cache(budget_tokens: int) -> PrefixCache[_Holder]:
    return PrefixCache(budget_bytes=budget_tokens * 10, kv_bytes_per_token=10)


def test_common_prefix_length() -> None:
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_length([], [1]) == 0
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2


def test_batches_start_and_end_on_cells_unless_the_prompt_ends() -> None:
    assert CELL_TOKENS == 16
    assert batch_end(0, 37, 1024) == 37  # the whole prompt fits: its end
    assert batch_end(0, 37, 32) == 32
    assert batch_end(32, 37, 32) == 37
    assert batch_end(0, 100, 20) == 16  # a budget that is not whole cells is rounded down to them
    assert batch_end(16, 100, 5) == 32  # but a batch is one cell at least


def test_only_the_prompts_whole_cells_are_exact_until_settled_and_the_longest_exact_prefix_wins() -> None:
    cache = _cache(1000)
    short, long = _Holder("short"), _Holder("long")
    cache.put(short, [*range(20), 99, 99], prompt_length=20, max_length=100, options_key=GREEDY)
    cache.put(long, list(range(50)), prompt_length=40, max_length=100, options_key=GREEDY)
    reuse = cache.take(list(range(60)), GREEDY, needed_length=80)
    assert reuse is not None and reuse.generator is long
    # Tokens 32-39 were the prompt's last, partial cell (a later prompt's batch there ends
    # elsewhere); 40-49 were decoded one by one: their KV is not a prefill's.
    assert reuse.keep == 32
    assert long.calls == [("rewind", 32)] and len(cache) == 1 and not long.closed
    assert (cache.hits, cache.misses, cache.reused_tokens) == (1, 0, 32)


def test_settling_recomputes_the_completions_whole_cells_in_batches() -> None:
    cache = _cache(1000)
    held = _Holder("a")
    tokens = list(range(100, 179))  # 79: a prompt of 20, 59 decoded
    cache.put(held, tokens, prompt_length=20, max_length=100, options_key=GREEDY)
    assert cache.has_unsettled
    cache.settle_step(max_tokens=32)
    assert cache.has_unsettled
    cache.settle_step(max_tokens=32)
    assert not cache.has_unsettled  # 64-78 are a partial cell: never settled
    assert held.calls == [("rewind", 16), ("append", tokens[16:48]), ("rewind", 48), ("append", tokens[48:64])]
    reuse = cache.take([*tokens, 7, 8, 9], GREEDY, needed_length=90)
    assert reuse is not None and reuse.keep == 64


def test_at_least_the_prompts_last_token_is_left_to_prefill() -> None:
    cache = _cache(1000)
    cache.put(_Holder("a"), list(range(32)), prompt_length=32, max_length=100, options_key=GREEDY)
    reuse = cache.take(list(range(32)), GREEDY, needed_length=40)
    assert reuse is not None and reuse.keep == 16  # the same prompt again: its last cell is prefilled


def test_other_search_options_no_room_or_less_than_a_cell_shared_is_a_miss() -> None:
    cache = _cache(1000)
    held = _Holder("a")
    tokens = list(range(40))
    cache.put(held, tokens, prompt_length=40, max_length=100, options_key=GREEDY)
    assert cache.take([*tokens, 1], ("sample", 0.7), needed_length=50) is None
    assert cache.take([*tokens, 1], GREEDY, needed_length=101) is None
    assert cache.take([*tokens[:15], 99, *tokens[16:]], GREEDY, needed_length=50) is None
    assert cache.misses == 3 and len(cache) == 1 and not held.closed and not held.calls


def test_the_budget_drops_the_least_recently_kept_and_refuses_what_cannot_fit() -> None:
    cache = _cache(250)  # 2 generators of max_length 100
    a, b, c, huge, tiny = _Holder("a"), _Holder("b"), _Holder("c"), _Holder("huge"), _Holder("tiny")
    for held in (a, b, c):
        cache.put(held, list(range(20)), prompt_length=20, max_length=100, options_key=GREEDY)
    assert a.closed and not b.closed and not c.closed and cache.used_bytes == 2000
    cache.put(huge, list(range(20)), prompt_length=20, max_length=300, options_key=GREEDY)
    assert huge.closed
    cache.put(tiny, list(range(15)), prompt_length=15, max_length=20, options_key=GREEDY)
    assert tiny.closed  # not one whole cell: nothing it holds could be reused
    cache.clear()
    assert b.closed and c.closed and len(cache) == 0 and cache.used_bytes == 0


def test_a_generator_that_fails_to_settle_is_dropped() -> None:
    cache = _cache(1000)
    broken = _Holder("broken", fail_on_append=True)
    cache.put(broken, list(range(40)), prompt_length=2, max_length=100, options_key=GREEDY)
    with pytest.raises(RuntimeError):
        cache.settle_step(max_tokens=32)
    assert broken.closed and len(cache) == 0 and not cache.has_unsettled


def test_a_disabled_cache_keeps_nothing() -> None:
    cache = _cache(0)
    assert not cache.enabled
    held = _Holder("a")
    cache.put(held, list(range(20)), prompt_length=20, max_length=30, options_key=GREEDY)
    assert held.closed and cache.take(list(range(21)), GREEDY, needed_length=25) is None
    unsized: PrefixCache[_Holder] = PrefixCache(budget_bytes=10**9, kv_bytes_per_token=0)
    assert not unsized.enabled  # a model whose config gives no KV size: nothing to count the budget in
    other = _Holder("b")
    unsized.put(other, list(range(20)), prompt_length=20, max_length=30, options_key=GREEDY)
    assert other.closed
