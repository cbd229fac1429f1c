"""A vision model the way the origin document ships Phi-3.5-vision: its own export script's
onnxruntime-genai folder (here the tiny phi3v of `testkit.vision`) through `edge-builder build`
(gated against its text model, an image canary recorded), signed, installed and activated by a
real `edge-agent run` (both canaries replayed), then asked about a picture through the API."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
import requests

from agent.wire.manifest import MANIFEST_FILENAME, Manifest
from builder.build.evaluate import CANARY_IMAGE_FILE, canary_picture
from builder.build.package import verify_artifact
from builder.build.pipeline import BuildRequest, build_artifact
from testkit.agents import Agent, release_repo
from testkit.vision import solid_png

NAME = "tiny-vision"


@pytest.fixture(scope="module")
def vision_artifact(tiny_phi3v: Path, tiny_phi3v_text_hf: Path, tmp_path_factory: pytest.TempPathFactory,
                    builder_cache_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("vision") / "artifact"
    build_artifact(BuildRequest(source=str(tiny_phi3v), reference=str(tiny_phi3v_text_hf), out_dir=out, name=NAME,
                                version=1, cache_dir=builder_cache_dir))
    return out


def test_the_build_ships_the_canary_picture_and_its_answer(vision_artifact: Path) -> None:
    manifest = verify_artifact(vision_artifact)  # every file listed and hashed, the picture among them
    image = manifest.evaluation.canary.image
    assert image is not None and image.image_file == CANARY_IMAGE_FILE
    assert (vision_artifact / CANARY_IMAGE_FILE).read_bytes() == canary_picture()
    assert image.prompt.startswith("<|image_1|>\n") and len(image.expected_token_ids) == len(image.expected_leads)
    assert manifest.source.kind == "ort_genai" and manifest.build.precision == "int4"
    assert {"vision.onnx", "embedding.onnx", "processor_config.json"} <= {f.path for f in manifest.files}


def _ask(agent: Agent, png: bytes) -> requests.Response:
    return requests.post(f"{agent.url}/v1/chat/completions", timeout=120, json={
        "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}},
            {"type": "text", "text": "What colour is this?"}]}]})


def test_a_device_activates_it_with_both_canaries_and_answers_about_pictures(vision_artifact: Path,
                                                                            tmp_path: Path) -> None:
    with release_repo(tmp_path) as release:
        release.repo.publish(vision_artifact)
        release.set_channel(NAME, 1)
        # v2: the same files, but an image canary the model never answers (as if the vision model,
        # its processor or its weights were not the ones built): it must not go live.
        bad = tmp_path / "bad-v2"
        shutil.copytree(vision_artifact, bad)
        data = json.loads((bad / MANIFEST_FILENAME).read_text())
        data["version"] = 2
        image = data["evaluation"]["canary"]["image"]
        image["expected_token_ids"] = [(t + 1) % 1000 for t in image["expected_token_ids"]]
        (bad / MANIFEST_FILENAME).write_text(Manifest.model_validate(data).model_dump_json(indent=2))
        agent = Agent(tmp_path / "box", release, extra={"intra_op_num_threads": 2}).start()
        try:
            agent.wait_serving(NAME, 1)
            assert "event=image_canary_passed model=tiny-vision" in agent.log()
            models = requests.get(f"{agent.url}/v1/models", timeout=10).json()["data"]
            assert models[0]["input_modalities"] == ["text", "image"]
            red, blue = _ask(agent, solid_png((220, 20, 20))), _ask(agent, solid_png((20, 20, 220)))
            assert red.status_code == blue.status_code == 200, red.text
            assert red.json()["usage"]["prompt_tokens"] > 1900
            assert red.json()["choices"][0]["message"]["content"] != blue.json()["choices"][0]["message"]["content"]

            release.repo.publish(bad)
            release.set_channel(NAME, 2)
            agent.stop()
            agent.start()  # checks at start
            agent.wait(lambda: "failed its canary: the image canary" in agent.log(), 180, "v2's image canary to fail")
            agent.wait_serving(NAME, 1)  # the previous model keeps serving, and answers as before
            assert _ask(agent, solid_png((220, 20, 20))).json()["choices"][0]["message"]["content"] == \
                red.json()["choices"][0]["message"]["content"]
        finally:
            agent.stop()


def test_the_footprint_of_a_vision_model_includes_its_largest_image_prompt(tiny_phi3v: Path) -> None:
    import subprocess
    import sys

    from agent.wire.worker import MAX_PROMPT_IMAGES
    from testkit.env import subprocess_env

    done = subprocess.run([sys.executable, "-m", "builder.build.footprint", str(tiny_phi3v), "8192"],
                          capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    # Four pictures (1,921 placeholder tokens each, as the runtime's processor crops them) fit 8,192.
    assert figures["image_prompt_tokens"] > MAX_PROMPT_IMAGES * 1900
    # Their pixels alone are 4 x 17 crops x 3 x 336 x 336 float32 (92 MB): the peak is the image prompt's.
    assert figures["peak_rss_bytes"] > figures["text_peak_rss_bytes"] + (64 << 20)
