"""The daemon against a real Mosquitto: updates rung by the doorbell and found by polling,
the broker dying mid-update, the will after SIGKILL, bad payloads, and systemd notify.

Every agent here is a real `edge-agent run` process with real tiny ORT-GenAI models from a
real TUF repository served over HTTP.
"""

from __future__ import annotations

import json
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.messages import Doorbell, encode
from agent.statemachine import Phase
from builder.fleet import ring_doorbell
from agent.mqtt_link import BrokerCredentials
from tests.brokers import Mosquitto, Recorder, mosquitto, publish_and_wait, wait_until  # noqa: F401
from tests.daemon_kit import Agent, Release, release_repo, tiny_raw  # noqa: F401

FLEET = "test"


@pytest.fixture
def release(tmp_path: Path) -> Iterator[Release]:
    with release_repo(tmp_path) as r:
        yield r


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    started: list[Agent] = []
    yield started
    for a in started:
        a.stop()


def _events(rec: Recorder, device: str) -> list[dict]:
    return rec.payloads(f"devices/{device}/events")


def test_update_rung_by_the_doorbell(tiny_raw: Path, release: Release, mosquitto: Mosquitto, tmp_path: Path,
                                     agents: list[Agent]) -> None:
    release.publish(tiny_raw, "tiny", 1)
    rec = Recorder(mosquitto.port, [f"edgefleet/{FLEET}/devices/+/events", f"edgefleet/{FLEET}/devices/+/status"])
    agent = Agent(tmp_path / "a", release, broker_url=mosquitto.url, poll_interval_s=3600)
    agents.append(agent.start())
    agent.wait_serving("tiny", 1)
    assert agent.chat().status_code == 200

    release.publish(tiny_raw, "tiny", 2)
    ring_doorbell(mosquitto.url, BrokerCredentials(), FLEET, Doorbell(repo_timestamp_version=2, channels=["stable"]))
    agent.wait_serving("tiny", 2, timeout_s=60)
    v2 = agent.store.model_dir("tiny", 2).resolve()
    agent.wait(lambda: agent.store.current() == v2, 30, "current -> v2")  # moves right after the canary passed
    assert agent.store.previous() == agent.store.model_dir("tiny", 1).resolve()
    assert agent.store.check_invariants() == []
    assert "triggers=doorbell" in agent.log()
    rec.wait_for(lambda ms: any(json.loads(m.payload).get("to_state") == "ACTIVE" and json.loads(m.payload).get(
        "version") == 2 for m in ms if m.topic.endswith("/events")), 30, "ACTIVE v2 event")
    rec.wait_for(lambda ms: any(m.topic.endswith("/status") and json.loads(m.payload).get("version") == 2
                                and json.loads(m.payload)["state"] == "ACTIVE" for m in ms), 30, "status v2")
    rec.close()
