from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.config import AgentConfig, load_config
from agent.wire.errors import ConfigError
from testkit.env import REPO_ROOT


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
        ('device_id = "d"\nrepo_url = "http://x"\ndownload_rate_limit_bytes_per_s = 100\n', {},
         "under download_min_rate_bytes_per_s"),
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


def test_every_edge_agent_variable_a_command_reads_is_a_config_key(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A variable a client command reads must not break the daemon's config: `edge-agent prompt`'s
    API URL lives outside the EDGE_AGENT_ prefix, and the daemon accepts it being exported."""
    from agent.cli import COMMAND_MODULES
    from agent.cli.prompt import ENV_API_URL
    from agent.wire.cli import build_parser

    cfg_file = tmp_path / "agent.toml"
    cfg_file.write_text('device_id = "d"\nrepo_url = "http://x"\n')
    assert not ENV_API_URL.startswith("EDGE_AGENT_")
    assert load_config(cfg_file, environ={ENV_API_URL: "http://127.0.0.1:9999"}).device_id == "d"
    monkeypatch.setenv(ENV_API_URL, "http://127.0.0.1:9999")
    args = build_parser("edge-agent", "", COMMAND_MODULES).parse_args(["prompt", "hi"])
    assert args.url == "http://127.0.0.1:9999"
    # Each EDGE_AGENT_* a command reads is a key the daemon accepts.
    read = {name for module in COMMAND_MODULES
            for name in re.findall(r"EDGE_AGENT_[A-Z_]+", (REPO_ROOT / (module.replace(".", "/") + ".py")).read_text())}
    assert read, "the scan found no variable: it is broken"
    unknown = {name for name in read if name.removeprefix("EDGE_AGENT_").lower() not in AgentConfig.model_fields}
    assert not unknown, f"{sorted(unknown)} would make `edge-agent run` refuse its config"
