"""The driver and store with the real SmolLM2 INT4 ORT-GenAI build: dedup of real files, a real
load + greedy canary, and rollback of correctly published but broken builds.

TEST DOUBLE: `OrtCanaryActivator` loads the model in this process with onnxruntime-genai and runs
the manifest's canary greedily; the serving layer's activator does the same in its own model-worker
process (integration phase). Checker and downloader are the local-disk doubles of test_updater.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from agent.update.statemachine import ModelRef, Phase
from agent.wire.errors import ActivationError
from agent.wire.manifest import Manifest
from testkit.fleet import greedy_ids
from testkit.store import manifest_for, publish_channel, write_artifact
from testkit.updater import LocalDirDownloader, make_updater

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
NEW_TOKENS = 8


class OrtCanaryActivator:
    """TEST DOUBLE for the serving layer: real og.Model load and greedy canary, in-process."""

    def __init__(self) -> None:
        self.serving: list[Path | None] = []

    def activate(self, model_dir: Path, manifest: Manifest) -> None:
        canary = manifest.evaluation.canary
        try:
            got = greedy_ids(model_dir, canary.prompt, canary.max_new_tokens)
        except Exception as e:  # og raises plain RuntimeError/OrtException for a model that does not load
            raise ActivationError(f"{manifest.name} v{manifest.version} failed to load: {e}") from e
        if got != canary.expected_token_ids:
            raise ActivationError(f"{manifest.name} v{manifest.version} canary gave {got},"
                                  f" expected {canary.expected_token_ids}")

    def serve(self, model_dir: Path | None) -> None:
        self.serving.append(model_dir)


def _publish_real(repo: Path, raw: Path, version: int, expected_ids: list[int],
                  config_edit: dict[str, object] | None = None) -> Manifest:
    files = {p.name: p.read_bytes() for p in sorted(raw.iterdir()) if p.is_file()}
    if config_edit is not None:
        config = json.loads(files["genai_config.json"])
        config["model"]["decoder"].update(config_edit)
        files["genai_config.json"] = json.dumps(config, indent=4).encode()
    m = manifest_for("smollm2", version, files)
    data = m.model_dump(mode="json")
    data["evaluation"]["canary"] = {"prompt": PROMPT, "max_new_tokens": NEW_TOKENS, "expected_token_ids": expected_ids}
    manifest = Manifest.model_validate(data)
    write_artifact(repo, manifest, files)
    publish_channel(repo, "stable", "smollm2", version)
    return manifest


def test_real_model_update_rollback_and_dedup(smollm2_int4_raw: Path, tmp_path: Path) -> None:
    repo, state_dir = tmp_path / "repo", tmp_path / "state"
    expected = greedy_ids(smollm2_int4_raw, PROMPT, NEW_TOKENS)
    assert len(expected) == NEW_TOKENS

    u = make_updater(repo, state_dir)
    activator = OrtCanaryActivator()
    u.activator = activator
    u.start()
    store = u.store
    _publish_real(repo, smollm2_int4_raw, 1, expected)
    state = u.check_now()
    assert state.phase is Phase.ACTIVE, state.reason
    v1 = store.model_dir("smollm2", 1).resolve()
    assert store.current() == v1 and store.check_invariants() == []

    # v2: correctly published, but its genai_config.json names a decoder file that is not there.
    _publish_real(repo, smollm2_int4_raw, 2, expected, config_edit={"filename": "missing.onnx"})
    state = u.check_now()
    assert state.phase is Phase.FAILED and "smollm2 v2 failed to load" in (state.reason or "")
    assert store.current() == v1 and ModelRef(name="smollm2", version=2) in state.refused

    # v3: loads, but its canary (as signed) does not reproduce.
    _publish_real(repo, smollm2_int4_raw, 3, [expected[0] + 1, *expected[1:]])
    state = u.check_now()
    assert state.phase is Phase.FAILED and f"canary gave {expected}" in (state.reason or "")
    assert store.current() == v1

    # v4: a good build; its weights are the same blobs as v1's, so only the config is new.
    _publish_real(repo, smollm2_int4_raw, 4, expected, config_edit={"session_options": {"log_id": "v4"}})
    state = u.check_now()
    assert state.phase is Phase.ACTIVE and store.current() == store.model_dir("smollm2", 4).resolve()
    assert store.previous() == v1
    downloader = u.downloader
    assert isinstance(downloader, LocalDirDownloader)
    assert [p for p in downloader.fetched if p.endswith("model.onnx.data")] == ["smollm2/1/model.onnx.data"]
    data_sha = hashlib.sha256((smollm2_int4_raw / "model.onnx.data").read_bytes()).hexdigest()
    assert store.blob_path(data_sha).stat().st_nlink >= 3  # blob + v1 + v4 (+ refused builds not yet collected)
    assert store.check_invariants() == []
    assert set(activator.serving[activator.serving.index(v1):-1]) == {v1}  # v1 served until v4 passed
