"""A device's MQTT link, in this process (`make_link`) or as a real child process (`LinkProcess`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig
from agent.link.backoff import Backoff
from agent.link.mqtt import MqttLink
from agent.link.outbox import Outbox
from testkit.brokers import Mosquitto
from testkit.env import REPO_ROOT, subprocess_env

FLEET = "test"


class LinkProcess:
    """testkit/link_process.py as a real child process."""

    def __init__(self, broker_url: str, device: str, state_dir: Path, **opts: Any) -> None:
        cmd = [sys.executable, str(REPO_ROOT / "testkit" / "link_process.py"), "--broker", broker_url,
               "--device", device, "--fleet", FLEET, "--state-dir", str(state_dir)]
        for key, value in opts.items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        self.stderr_path = state_dir.parent / f"{device}-{os.getpid()}-{id(self)}.log"
        state_dir.mkdir(parents=True, exist_ok=True)
        self._err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
                                     env=subprocess_env(), text=True)
        self.hello = self.read()

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"link process died: {self.stderr_path.read_text()[-3000:]}")
        return json.loads(line)

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def sigkill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._err.close()


@pytest.fixture
def link_processes() -> Iterator[list[LinkProcess]]:
    started: list[LinkProcess] = []
    yield started
    for p in started:
        p.sigkill()


def make_link(broker: Mosquitto, tmp_path: Path, device: str = "dev-1", protocol: str = "3.1.1",
              **kwargs: Any) -> MqttLink:
    config = AgentConfig(device_id=device, fleet=FLEET, repo_url="http://127.0.0.1:9", state_dir=tmp_path / device,
                         broker_url=broker.url, mqtt_protocol=protocol)
    outbox = Outbox(config.state_dir / "outbox")
    return MqttLink(config, outbox, keepalive_s=5, backoff=Backoff(initial_s=0.05, max_s=0.5), **kwargs)
