"""SIGHUP with a config that cannot be used (half written, a typo, a missing key, an empty token):
the daemon says why, keeps the running config (its token included) and keeps serving; a good
config afterwards applies at once, the serving limits (`parallel`, `queue_size`) too."""

from __future__ import annotations

import json
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from testkit.agents import Agent, Release
from testkit.serving import model_workers
from testkit.waits import wait_until

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}


def _chat_status(agent: Agent, token: str) -> int:
    return requests.post(f"{agent.url}/v1/chat/completions", json=CHAT, timeout=60,
                         headers={"Authorization": f"Bearer {token}"}).status_code


def test_a_bad_config_on_sighup_keeps_the_running_one(tiny_raw: Path, release: Release, tmp_path: Path) -> None:
    release.publish(tiny_raw, "tiny", 1)
    agent = Agent(tmp_path / "a", release, extra={"api_token": "old-token"})
    good = dict(agent.config_values)
    lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in good.items())
    broken = {
        "half written": lines[: len(lines) // 2] + 'api_token = "new-tok',
        "a typo in a key": lines + 'api_tokn = "new-token"\n',
        "a missing key": 'device_id = "box-1"\napi_token = "new-token"\n',
        "an empty token": lines.replace('api_token = "old-token"', 'api_token = ""'),
    }
    agent.start()
    try:
        agent.wait_serving("tiny", 1)
        assert _chat_status(agent, "old-token") == 200
        assert agent.proc is not None
        for n, (what, text) in enumerate(broken.items(), start=1):
            agent.config_path.write_text(text)
            agent.proc.send_signal(signal.SIGHUP)
            agent.wait(lambda n=n: agent.log().count("event=reload_failed") == n, 30, f"the reload of {what} to fail")
            failure = [line for line in agent.log().splitlines() if "event=reload_failed" in line][-1]
            assert "keeping the running config" in failure, (what, failure)
            assert _chat_status(agent, "old-token") == 200, what
            assert _chat_status(agent, "new-token") == 401, what
            assert agent.health() == {"status": "ok", "model": "tiny", "version": 1}
        assert "event=config_reloaded" not in agent.log()

        agent.write_config({**good, "api_token": "new-token"})
        agent.proc.send_signal(signal.SIGHUP)
        agent.wait(lambda: "event=config_reloaded" in agent.log(), 30, "the good config to apply")
        assert (_chat_status(agent, "new-token"), _chat_status(agent, "old-token")) == (200, 401)
        assert agent.proc.poll() is None
    finally:
        agent.stop()


def test_parallel_and_queue_size_are_keys_a_reload_applies_at_once(tiny_raw: Path, release: Release,
                                                                    tmp_path: Path) -> None:
    release.publish(tiny_raw, "tiny", 1)
    agent = Agent(tmp_path / "a", release)
    agent.start()
    try:
        agent.wait_serving("tiny", 1)
        assert agent.proc is not None
        agent.write_config({**agent.config_values, "parallel": 1, "queue_size": 0})
        agent.proc.send_signal(signal.SIGHUP)
        agent.wait(lambda: "event=config_reloaded" in agent.log(), 30, "the new limits to apply")
        (worker,) = model_workers(agent.proc.pid, str(agent.store.model_dir("tiny", 1)), recursive=True)
        worker.send_signal(signal.SIGSTOP)  # the request that takes the one slot cannot finish
        with ThreadPoolExecutor(1) as pool:
            holder = pool.submit(requests.post, f"{agent.url}/v1/chat/completions", json=CHAT, timeout=120)
            wait_until(lambda: "edgefleet_active_requests 1.0" in requests.get(f"{agent.url}/metrics", timeout=5).text,
                       30, "the first request to take the slot")
            refused = requests.post(f"{agent.url}/v1/chat/completions", json=CHAT, timeout=30)
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["code"] == "queue_full" and refused.headers["Retry-After"]
            worker.send_signal(signal.SIGCONT)
            assert holder.result(timeout=120).status_code == 200
        assert _chat_status(agent, "") == 200  # the slot is free again
    finally:
        agent.stop()
