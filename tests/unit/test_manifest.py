"""The manifest and channel models reject what an attacker or a bug could produce."""

from __future__ import annotations

import datetime as dt

import pytest
from pydantic import ValidationError

from agent.wire.channel import ChannelFile, Rollout, cohort_bucket, is_in_cohort
from agent.wire.manifest import Manifest

SHA = "a" * 64


def manifest_dict(**overrides: object) -> dict:
    data: dict = {
        "schema_version": 1,
        "name": "smollm2-135m",
        "version": 1,
        "label": "test",
        "created_at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC).isoformat(),
        "source": {"kind": "gguf", "reference": "x.gguf", "sha256": SHA},
        "build": {
            "precision": "int4", "execution_provider": "cpu", "profile": "cpu",
            "onnxruntime_genai_version": "0.18.0", "onnxruntime_version": "1.22",
            "transformers_version": "5.0", "builder_options": {"block_size": "32"},
        },
        "files": [{"path": "model.onnx", "size": 10, "sha256": SHA},
                  {"path": "sub/model.onnx.data", "size": 0, "sha256": "b" * 64}],
        "requirements": {
            "min_ram_bytes": 1, "ram_margin_bytes": 0, "min_free_disk_bytes": 10, "arch": ["x86_64"],
            "cpu_features": [], "min_onnxruntime_genai_version": "0.18.0", "execution_provider": "cpu",
        },
        "evaluation": {
            "perplexity": 10.0, "reference_perplexity": 9.0, "perplexity_ratio": 1.11,
            "max_perplexity_ratio": 1.5, "eval_text_sha256": SHA, "eval_tokens": 1000,
            "decode_tokens_per_s": 1.0, "prefill_tokens_per_s": 1.0, "peak_rss_bytes": 1,
            "canary": {"prompt": "hi", "max_new_tokens": 4, "expected_token_ids": [1, 2]},
        },
        "model_info": {"architecture": "llama", "parameter_count": 1, "context_length": 8, "vocab_size": 8},
    }
    data.update(overrides)
    return data


def test_valid_manifest_round_trips() -> None:
    m = Manifest.model_validate(manifest_dict())
    assert Manifest.model_validate_json(m.model_dump_json()) == m
    assert m.total_file_bytes == 10
    assert m.target_prefix() == "models/smollm2-135m/1"


@pytest.mark.parametrize("path", ["/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a\\b", "C:x", ""])
def test_bad_paths_are_rejected(path: str) -> None:
    with pytest.raises(ValidationError, match=r"files\.0\.path"):
        Manifest.model_validate(manifest_dict(files=[{"path": path, "size": 1, "sha256": SHA}]))


def test_duplicates_negative_sizes_and_bad_hashes_are_rejected() -> None:
    f = {"path": "model.onnx", "size": 1, "sha256": SHA}
    with pytest.raises(ValidationError, match="duplicate"):
        Manifest.model_validate(manifest_dict(files=[f, dict(f, path="MODEL.onnx")]))
    with pytest.raises(ValidationError, match=r"files\.0\.size\n  Input should be greater than or equal to 0"):
        Manifest.model_validate(manifest_dict(files=[dict(f, size=-1)]))
    with pytest.raises(ValidationError, match="'xyz' is not a lowercase hex sha256 digest"):
        Manifest.model_validate(manifest_dict(files=[dict(f, sha256="xyz")]))
    with pytest.raises(ValidationError, match="unexpected\n  Extra inputs are not permitted"):
        Manifest.model_validate(manifest_dict(unexpected=1))
    with pytest.raises(ValidationError, match="version\n  Input should be greater than 0"):
        Manifest.model_validate(manifest_dict(version=0))
    with pytest.raises(ValidationError, match="model name '../evil' must be"):
        Manifest.model_validate(manifest_dict(name="../evil"))


def test_cohort_is_stable_and_monotonic_in_percent() -> None:
    ids = [f"dev-{i}" for i in range(400)]
    buckets = [cohort_bucket("salt", d) for d in ids]
    assert all(0 <= b < 100 for b in buckets)
    in_25 = {d for d in ids if is_in_cohort(Rollout(percent=25, salt="salt"), d)}
    in_50 = {d for d in ids if is_in_cohort(Rollout(percent=50, salt="salt"), d)}
    assert in_25 < in_50  # raising the percent only ever adds devices
    assert 50 < len(in_25) < 150
    assert not any(is_in_cohort(Rollout(percent=0, salt="salt"), d) for d in ids)
    assert all(is_in_cohort(Rollout(percent=100, salt="salt"), d) for d in ids)
    with pytest.raises(ValidationError, match="percent\n  Input should be less than or equal to 100"):
        ChannelFile(channel="stable", model="m", version=1, rollout=Rollout(percent=101))


@pytest.mark.parametrize("paths", [["a", "a/b"], ["a/b/c", "A/B"], ["manifest.json/x"], ["x/y", "x/y/z/w"]])
def test_a_file_that_is_also_a_directory_is_rejected(paths: list[str]) -> None:
    """No model dir can hold both `a` and `a/b`: the manifest is refused before any download."""
    files = [{"path": p, "size": 1, "sha256": SHA} for p in paths]
    with pytest.raises(ValidationError, match="is also a directory of"):
        Manifest.model_validate(manifest_dict(files=files))


def test_sibling_paths_sharing_a_prefix_are_fine() -> None:
    files = [{"path": p, "size": 1, "sha256": SHA} for p in ("a", "ab/c", "a.data", "b/a")]
    assert [f.path for f in Manifest.model_validate(manifest_dict(files=files)).files] == ["a", "ab/c", "a.data", "b/a"]


def test_gpu_fields_are_left_out_of_a_cpu_build_so_older_agents_still_read_it() -> None:
    cpu = Manifest.model_validate(manifest_dict())
    written = cpu.model_dump_json()
    assert "min_accelerator_memory_bytes" not in written and "measured_on" not in written
    assert Manifest.model_validate_json(written) == cpu
    gpu = manifest_dict()
    gpu["build"] = {**gpu["build"], "execution_provider": "cuda", "profile": "cuda"}
    gpu["requirements"] = {**gpu["requirements"], "execution_provider": "cuda", "min_accelerator_memory_bytes": 2**30}
    written = Manifest.model_validate(gpu).model_dump_json()
    assert '"min_accelerator_memory_bytes":1073741824' in written and "measured_on" not in written
    assert Manifest.model_validate_json(written).requirements.min_accelerator_memory_bytes == 2**30
