from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load_config
from agent.errors import ConfigError


def test_toml_env_override_and_defaults(tmp_path: Path) -> None:
    cfg_file = tmp_path / "agent.toml"
    cfg_file.write_text('device_id = "dev-1"\nrepo_url = "http://127.0.0.1:1/"\npoll_interval_s = 5\n')
    cfg = load_config(cfg_file, environ={"EDGE_AGENT_POLL_INTERVAL_S": "7", "EDGE_AGENT_CHANNEL": "beta"})
    assert cfg.device_id == "dev-1"
    assert cfg.repo_url == "http://127.0.0.1:1"
    assert cfg.poll_interval_s == 7.0
    assert cfg.channel == "beta"
    assert cfg.fleet == "default"


@pytest.mark.parametrize(
    ("text", "env", "needle"),
    [
        ('device_id = "d"\nrepo_url = "http://x"\ncolour = 1\n', {}, "'colour': unknown key"),
        ('device_id = "d"\nrepo_url = "ftp://x"\n', {}, "'repo_url'"),
        ('device_id = "d"\nrepo_url = "http://x"\n', {"EDGE_AGENT_NOPE": "1"}, "EDGE_AGENT_NOPE"),
        ('device_id = "d"\nrepo_url = "http://x"\npoll_interval_s = -1\n', {}, "'poll_interval_s'"),
        ("device_id = \n", {}, "not valid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, env: dict[str, str], needle: str) -> None:
    cfg_file = tmp_path / "agent.toml"
    cfg_file.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        load_config(cfg_file, environ=env)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", environ={})
