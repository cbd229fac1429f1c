"""A request's unread events in the API process (`agent.serving.worker.client._EventBox`): token
events that pile up merge into one, except into the first, which is always a chunk of its own."""

from __future__ import annotations

import asyncio

from agent.serving.worker.client import _EventBox
from agent.wire.worker import DoneEvent, TokenEvent


def _token(i: int) -> TokenEvent:
    return TokenEvent(id="r", token_ids=[i], text=f"t{i}")


def test_piled_up_tokens_merge_but_never_into_the_first() -> None:
    box = _EventBox()
    for i in range(4):
        box.put(_token(i))
    box.put(DoneEvent(id="r", finish_reason="stop", prompt_tokens=3, completion_tokens=4, cached_tokens=0))

    async def drain() -> list[object]:
        return [await asyncio.wait_for(box.get(), 5) for _ in range(3)]

    first, rest, done = asyncio.run(drain())
    assert isinstance(first, TokenEvent) and first.token_ids == [0] and first.text == "t0"
    assert isinstance(rest, TokenEvent) and rest.token_ids == [1, 2, 3] and rest.text == "t1t2t3"
    assert isinstance(done, DoneEvent)
