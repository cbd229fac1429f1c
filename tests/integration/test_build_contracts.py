"""Output contracts at build time: `--contract` puts the file into the artifact (listed and
hashed in the manifest, so signed with the weights) after the built model answered every
example validly; a contract whose examples fail stops the build at the quality gate, and a
malformed one stops it before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.wire.contract import read_contracts
from agent.wire.errors import ExitCode, QualityGateError
from builder.build.contracts import check_contracts
from builder.build.package import verify_artifact
from builder.build.pipeline import BuildRequest, build_artifact
from testkit.env import subprocess_env

YES_NO = {"response_format": {"type": "regex", "regex": "(yes|no)"}, "examples": ["Is the sky blue?", "Is 2 odd?"]}
CITY = {
    "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": {
        "type": "object", "additionalProperties": False, "required": ["city", "country"],
        "properties": {"city": {"type": "string", "maxLength": 40}, "country": {"type": "string", "maxLength": 40}}}}},
    "system_prompt": "You answer with one JSON object about the city the user names.",
    "examples": ["Tell me about Paris.", "Tell me about Lima."],
}
# An unbounded string and 8 tokens: the answer cannot end in time.
NOTES = {"response_format": {"type": "json_schema", "json_schema": {"name": "notes", "schema": {
    "type": "object", "required": ["notes"], "properties": {"notes": {"type": "string"}}}}},
    "sampling": {"max_tokens": 8}, "examples": ["Write long notes about the sea."]}


def _file(folder: Path, name: str, body: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(body))
    return path


def test_a_build_carries_its_contracts_in_the_signed_file_list(tiny_hf: Path, tmp_path: Path,
                                                                builder_cache_dir: Path) -> None:
    """A random-weight model answers a regex contract validly: the constraint, not the model, does it.
    (`tiny_hf`, not the seed-0 tiny llama: that one is the seed-0 tiny mistral's twin, and
    test_build_tiny tells the sources apart by their reference perplexities.)"""
    out = tmp_path / "artifact"
    contract = _file(tmp_path / "contracts-src", "yes-no", YES_NO)
    result = build_artifact(BuildRequest(source=str(tiny_hf), out_dir=out,
                                         cache_dir=builder_cache_dir, contracts=[contract]))
    manifest = verify_artifact(out)
    listed = {f.path: f.sha256 for f in manifest.files}
    assert "contracts/yes-no.json" in listed and result.contracts == ["yes-no"]
    assert (out / "contracts" / "yes-no.json").read_bytes() == contract.read_bytes()
    assert list(read_contracts(out)) == ["yes-no"]
    # built again with the same contract: reused; with another: refused, not silently reused
    again = build_artifact(BuildRequest(source=str(tiny_hf), out_dir=out,
                                        cache_dir=builder_cache_dir, contracts=[contract]))
    assert again.is_reused
    other = _file(tmp_path / "other", "yes-no", {**YES_NO, "examples": ["Is water wet?"]})
    with pytest.raises(Exception, match="already holds a different build"):
        build_artifact(BuildRequest(source=str(tiny_hf), out_dir=out, cache_dir=builder_cache_dir,
                                    contracts=[other]))
    # a contract-only release: version 2 with the other contract differs from version 1 in the
    # contract alone (the builds are deterministic), so a device fetches only that file
    # (test_daemon_contracts.py shows the fetching)
    build_artifact(BuildRequest(source=str(tiny_hf), out_dir=tmp_path / "v2", version=2,
                                cache_dir=builder_cache_dir, contracts=[other]))
    v2 = {f.path: f.sha256 for f in verify_artifact(tmp_path / "v2").files}
    assert {p for p in listed if listed[p] != v2.get(p)} == {"contracts/yes-no.json"} and v2.keys() == listed.keys()


def _copy_of(model: Path, into: Path) -> Path:
    into.mkdir()
    for item in model.iterdir():
        if item.is_file():
            os.link(item, into / item.name)
    return into


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city"],
    "properties": {"city": {"type": "string", "maxLength": 40}}}}}


def test_smollm2_answers_a_json_contract_and_a_tools_contract_validly(smollm2_int4_raw: Path) -> None:
    from agent.wire.contract import Contract

    check_contracts(smollm2_int4_raw, {  # raises if any example fails
        "city": Contract.model_validate(CITY),
        "weather": Contract.model_validate({"tools": [WEATHER_TOOL], "examples": ["Weather in Rome?"]})})


@pytest.mark.parametrize(("body", "message"), [
    (NOTES, r"contract 'notes', example 1 \('Write long notes about the sea.'\): the answer was cut short "
            r".*\(at most 8 tokens\): raise the contract's sampling.max_tokens"),
    ({**YES_NO, "response_format": {"type": "regex", "regex": "(unclosed"}}, "contract 'notes' does not compile"),
])
def test_a_contract_whose_examples_fail_stops_at_the_quality_gate(smollm2_int4_raw: Path, body: dict[str, Any],
                                                                   message: str) -> None:
    from agent.wire.contract import Contract

    with pytest.raises(QualityGateError, match=message):
        check_contracts(smollm2_int4_raw, {"notes": Contract.model_validate(body)})


def test_the_cli_fails_a_build_at_the_gate_and_packages_nothing(tiny_hf: Path, tmp_path: Path,
                                                                 builder_cache_dir: Path) -> None:
    notes = _file(tmp_path / "src", "notes", NOTES)
    out = tmp_path / "artifact"
    run = subprocess.run([sys.executable, "-m", "builder.cli", "build", str(tiny_hf), "-o", str(out),
                          "-c", str(builder_cache_dir), "--contract", str(notes)],
                         env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == ExitCode.QUALITY_GATE_FAILED, run.stderr[-2000:]
    assert "contract 'notes', example 1" in run.stderr and "Traceback" not in run.stderr
    assert not out.exists()


@pytest.mark.parametrize(("name", "body", "message"), [
    ("city", {**CITY, "examples": []}, "is not a valid contract"),
    ("City", CITY, "name the file <name>.json"),
    ("city", "{not json", "is not a valid contract"),
])
def test_a_malformed_contract_stops_the_build_before_any_work(tmp_path: Path, name: str, body: Any,
                                                              message: str) -> None:
    path = tmp_path / f"{name}.json"
    path.write_text(body if isinstance(body, str) else json.dumps(body))
    run = subprocess.run([sys.executable, "-m", "builder.cli", "build", "smollm2-135m", "-o", str(tmp_path / "out"),
                          "--contract", str(path)], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == ExitCode.USAGE, run.stderr[-2000:]
    assert message in run.stderr and str(path) in run.stderr
    assert "resolve source" not in run.stderr  # refused before the source was even looked at
