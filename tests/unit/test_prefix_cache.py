"""The prefix cache's policy: the longest exact prefix wins, same search options only, room for
the request, at least two prompt tokens left to prefill, kept completions settled in batches,
the byte budget kept by dropping the least recently kept."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from agent.serving.prefix_cache import PrefixCache, common_prefix_length

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


def test_only_the_prompt_is_exact_until_settled_and_the_longest_exact_prefix_wins() -> None:
    cache = _cache(1000)
    short, long = _Holder("short"), _Holder("long")
    cache.put(short, [1, 2, 9, 9], prompt_length=3, max_length=100, options_key=GREEDY)
    cache.put(long, [1, 2, 3, 4, 5, 6, 7], prompt_length=5, max_length=100, options_key=GREEDY)
    reuse = cache.take([1, 2, 3, 4, 5, 6, 7, 8, 9], GREEDY, needed_length=50)
    assert reuse is not None and reuse.generator is long
    assert reuse.keep == 5  # tokens 6, 7 were decoded one by one: their KV is not a prefill's
    assert long.calls == [("rewind", 5)] and len(cache) == 1 and not long.closed
    assert (cache.hits, cache.misses, cache.reused_tokens) == (1, 0, 5)


def test_settling_recomputes_the_completion_in_batches_of_two_or_more() -> None:
    cache = _cache(1000)
    held = _Holder("a")
    cache.put(held, list(range(1, 13)), prompt_length=4, max_length=100, options_key=GREEDY)  # 8 decoded
    assert cache.has_unsettled
    cache.settle_step(max_tokens=3)
    cache.settle_step(max_tokens=3)
    assert cache.has_unsettled
    cache.settle_step(max_tokens=3)  # 2 were left: no lone token remains for a next step
    assert not cache.has_unsettled
    assert held.calls == [("rewind", 4), ("append", [5, 6, 7]), ("rewind", 7), ("append", [8, 9, 10]),
                          ("rewind", 10), ("append", [11, 12])]
    reuse = cache.take(list(range(1, 20)), GREEDY, needed_length=50)
    assert reuse is not None and reuse.keep == 12  # all of it, the last token included


def test_a_lone_last_token_is_settled_with_the_one_before() -> None:
    cache = _cache(1000)
    held = _Holder("a")
    cache.put(held, [1, 2, 3, 4], prompt_length=3, max_length=100, options_key=GREEDY)  # one token decoded
    cache.settle_step(max_tokens=32)
    assert held.calls == [("rewind", 2), ("append", [3, 4])] and not cache.has_unsettled


def test_at_least_two_prompt_tokens_are_left_to_prefill() -> None:
    cache = _cache(1000)
    cache.put(_Holder("a"), [1, 2, 3, 4, 5], prompt_length=5, max_length=100, options_key=GREEDY)
    reuse = cache.take([1, 2, 3, 4, 5], GREEDY, needed_length=10)
    assert reuse is not None and reuse.keep == 3


def test_other_search_options_no_room_or_nothing_shared_is_a_miss() -> None:
    cache = _cache(1000)
    held = _Holder("a")
    cache.put(held, [1, 2, 3, 4], prompt_length=4, max_length=100, options_key=GREEDY)
    assert cache.take([1, 2, 3, 5], ("sample", 0.7), needed_length=10) is None
    assert cache.take([1, 2, 3, 5], GREEDY, needed_length=101) is None
    assert cache.take([9, 2, 3, 5], GREEDY, needed_length=10) is None
    assert cache.misses == 3 and len(cache) == 1 and not held.closed and not held.calls


def test_the_budget_drops_the_least_recently_kept_and_refuses_what_cannot_fit() -> None:
    cache = _cache(250)  # 2 generators of max_length 100
    a, b, c, huge = _Holder("a"), _Holder("b"), _Holder("c"), _Holder("huge")
    for held in (a, b, c):
        cache.put(held, [1, 2], prompt_length=2, max_length=100, options_key=GREEDY)
    assert a.closed and not b.closed and not c.closed and cache.used_bytes == 2000
    cache.put(huge, [7, 8], prompt_length=2, max_length=300, options_key=GREEDY)
    assert huge.closed
    cache.clear()
    assert b.closed and c.closed and len(cache) == 0 and cache.used_bytes == 0


def test_a_generator_that_fails_to_settle_is_dropped() -> None:
    cache = _cache(1000)
    broken = _Holder("broken", fail_on_append=True)
    cache.put(broken, [1, 2, 3, 4, 5], prompt_length=2, max_length=100, options_key=GREEDY)
    with pytest.raises(RuntimeError):
        cache.settle_step(max_tokens=32)
    assert broken.closed and len(cache) == 0 and not cache.has_unsettled


def test_a_disabled_cache_keeps_nothing() -> None:
    cache = _cache(0)
    assert not cache.enabled
    held = _Holder("a")
    cache.put(held, [1, 2, 3], prompt_length=2, max_length=10, options_key=GREEDY)
    assert held.closed and cache.take([1, 2, 3, 4], GREEDY, needed_length=5) is None
    unsized: PrefixCache[_Holder] = PrefixCache(budget_bytes=10**9, kv_bytes_per_token=0)
    assert not unsized.enabled  # a model whose config gives no KV size: nothing to count the budget in
    other = _Holder("b")
    unsized.put(other, [1, 2, 3], prompt_length=2, max_length=10, options_key=GREEDY)
    assert other.closed
