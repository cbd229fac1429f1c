"""Output contracts through a real release to a real agent: a contract signed with the model
is served as `<model>/<contract>` once the new model passed its canary and its contract check;
a release whose contract fails that check on the device is rolled back while the previous
model keeps serving; and a release that changes only a contract downloads only that file."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from agent.update.journal import Journal
from agent.update.statemachine import ModelRef, Phase
from testkit.agents import Agent, Release, installed_agent

# A random-weight model answers a regex contract validly: the constraint does it.
YES_NO = {"response_format": {"type": "regex", "regex": "(yes|no)"}, "examples": ["Is the sky blue?"]}
# An unbounded string in 8 tokens: its first example is cut short on any device.
NOTES = {"response_format": {"type": "json_schema", "json_schema": {"name": "notes", "schema": {
    "type": "object", "required": ["notes"], "properties": {"notes": {"type": "string"}}}}},
    "sampling": {"max_tokens": 8}, "examples": ["Write long notes about the sea."]}


def _contracts(**contracts: dict[str, object]) -> dict[str, bytes]:
    return {f"contracts/{name.replace('_', '-')}.json": json.dumps(body).encode() for name, body in contracts.items()}


@pytest.fixture
def agent(tiny_raw: Path, release: Release, tmp_path: Path) -> Iterator[Agent]:
    with installed_agent(release, tiny_raw, tmp_path / "a", extra_files=_contracts(yes_no=YES_NO)) as a:
        yield a


def _update(agent: Agent) -> None:
    n = agent.log().count("event=check_requested")
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)
    agent.wait(lambda: agent.log().count("event=check_requested") > n, 30, "a check")


def test_a_signed_contract_is_served_and_a_failing_one_rolls_back(tiny_raw: Path, release: Release,
                                                                   agent: Agent) -> None:
    models = [c["id"] for c in requests.get(f"{agent.url}/v1/models", timeout=10).json()["data"]]
    assert models == ["tiny", "tiny/yes-no"]
    assert "event=contract_checked model=tiny contract=yes-no" in agent.log()
    r = requests.post(f"{agent.url}/v1/chat/completions", timeout=60,
                      json={"model": "tiny/yes-no", "messages": [{"role": "user", "content": "Is it raining?"}]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] in ("yes", "no"), r.text

    release.publish(tiny_raw, "tiny", 2, extra_files=_contracts(yes_no=YES_NO, notes=NOTES))
    _update(agent)
    agent.wait(lambda: agent.phase() is Phase.FAILED, 60, "v2 rolled back")
    state = Journal(agent.store.journal_path).load()
    assert "failed its contract check: contract 'notes', its first example: the answer was cut short" \
        in (state.reason or ""), state.reason
    assert ModelRef(name="tiny", version=2) in state.refused
    assert agent.health() == {"status": "ok", "model": "tiny", "version": 1}
    assert agent.store.current() == agent.store.model_dir("tiny", 1).resolve()


def test_a_contract_only_release_downloads_only_the_contract(tiny_raw: Path, release: Release, agent: Agent) -> None:
    changed = {**YES_NO, "examples": ["Is the sea salty?"]}
    release.publish(tiny_raw, "tiny", 2, extra_files=_contracts(yes_no=changed))
    _update(agent)
    agent.wait_serving("tiny", 2)
    # edition.txt is the test artifact's own per-version file; every model file is reused from v1
    # (target file names carry their sha256: consistent snapshots)
    fetched = sorted(p.rsplit("/", 1)[-1].split(".", 1)[1] for p in release.artifact_gets("tiny", 2))
    assert fetched == ["edition.txt", "yes-no.json"]
    served = agent.store.model_dir("tiny", 2) / "contracts" / "yes-no.json"
    assert json.loads(served.read_text())["examples"] == ["Is the sea salty?"]


def test_a_contract_built_by_the_builder_reaches_a_device_and_is_served(
        tiny_hf: Path, builder_cache_dir: Path, release: Release, agent: Agent, tmp_path: Path) -> None:
    """The whole path: `edge-builder build --contract` (in process), signed and published, installed
    by a real agent (canary and contract check), then called as `<model>/<contract>`."""
    from builder.build.pipeline import BuildRequest, build_artifact

    contract = tmp_path / "ask.json"
    contract.write_text(json.dumps({**YES_NO, "system_prompt": "Answer yes or no."}))
    out = tmp_path / "built"
    build_artifact(BuildRequest(source=str(tiny_hf), out_dir=out, name="tiny",
                                version=2, cache_dir=builder_cache_dir, contracts=[contract]))
    release.repo.publish(out)
    release.set_channel("tiny", 2)
    _update(agent)
    agent.wait_serving("tiny", 2)
    assert "event=contract_checked model=tiny contract=ask" in agent.log()
    r = requests.post(f"{agent.url}/v1/chat/completions", timeout=60,
                      json={"model": "tiny/ask", "messages": [{"role": "user", "content": "Is it late?"}]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] in ("yes", "no"), r.text
    assert r.json()["model"] == "tiny/ask"
