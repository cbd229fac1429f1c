"""Correctly signed packages that point outside themselves, through the real daemon: a
genai_config.json naming a file by absolute path, a custom operator library, a profiling
output, and ONNX external data stored "../" away. Each is refused by the load check before
onnxruntime sees it (the journal names why), and the previous model keeps serving.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import pytest

from agent.update.journal import Journal
from agent.update.statemachine import ModelRef, Phase
from testkit.agents import Agent, Release


def _external_data_outside(raw: Path) -> dict[str, bytes]:
    model = onnx.load(str(raw / "model.onnx"), load_external_data=False)
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = "../../../../etc/hostname"
                return {"model.onnx": model.SerializeToString()}
    raise AssertionError("the tiny model stores no weight as external data")


@pytest.fixture
def agent(tiny_raw: Path, release: Release, tmp_path: Path) -> Iterator[Agent]:
    release.publish(tiny_raw, "tiny", 1)
    agent = Agent(tmp_path / "a", release)
    try:
        agent.start()
        agent.wait_serving("tiny", 1)
        yield agent
    finally:
        agent.stop()


@pytest.mark.parametrize(("package", "reason"), [
    ({"config_edit": {"filename": "/etc/hostname"}}, "not a path inside the model dir"),
    ({"config_edit": {"session_options": {"custom_ops_library": "/usr/lib/evil.so"}}}, "custom operator library"),
    ({"config_edit": {"session_options": {"enable_profiling": "/var/tmp/profile"}}}, "profiling"),
    ("external-data-outside", "external data location"),
], ids=["absolute-model-file", "custom-ops-library", "profiling", "external-data-outside"])
def test_a_signed_package_pointing_outside_itself_is_refused_and_v1_keeps_serving(
        tiny_raw: Path, release: Release, agent: Agent, package: dict[str, Any] | str, reason: str) -> None:
    kwargs = {"extra_files": _external_data_outside(tiny_raw)} if package == "external-data-outside" else package
    assert isinstance(kwargs, dict)
    release.publish(tiny_raw, "tiny", 2, **kwargs)
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)  # the reload runs the check
    agent.wait(lambda: agent.phase() is Phase.FAILED, 60, "v2 refused")
    state = Journal(agent.store.journal_path).load()
    assert reason in (state.reason or "") and ModelRef(name="tiny", version=2) in state.refused, state.reason
    assert "onnxruntime-genai cannot load" not in (state.reason or "")  # refused before onnxruntime ran
    assert agent.store.current() == agent.store.model_dir("tiny", 1).resolve()
    assert agent.chat().status_code == 200 and agent.health() == {"status": "ok", "model": "tiny", "version": 1}
