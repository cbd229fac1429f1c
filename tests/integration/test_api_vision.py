"""Images in chat requests (OpenAI's image_url parts) on a real multimodal model: a tiny phi3v
folder (`testkit.vision`) served by real model workers, asked through the official client.

The tiny model reads an image's mean colour, so a red and a blue picture give different greedy
answers; each answer is checked token for token against the runtime run directly in this process.
Hostile and unusable images each get a 400 naming the part, and the worker keeps serving."""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import requests

from agent.serving.images import MAX_IMAGE_PIXELS, MAX_IMAGES
from agent.serving.runtime import ModelRuntime
from agent.wire.worker import SamplingOptions
from testkit.serving import ServerThread, model_workers
from testkit.vision import solid_png

RED, BLUE = solid_png((220, 20, 20)), solid_png((20, 20, 220))
QUESTION = "What colour is this?"


def data_url(png: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(png).decode()}"


def image_message(*urls: str, text: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}} for u in urls),
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    (folder / "red.png").write_bytes(RED)
    return folder


@pytest.fixture(scope="module")
def vision_server(tiny_phi3v: Path, images_dir: Path) -> Iterator[ServerThread]:
    with ServerThread(tiny_phi3v, threads=2, image_dir=images_dir) as server:
        yield server


@pytest.fixture(scope="module")
def client(vision_server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{vision_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def direct(tiny_phi3v: Path) -> Iterator[ModelRuntime]:
    runtime = ModelRuntime(tiny_phi3v, intra_op_num_threads=2)
    yield runtime
    runtime.close()


def _direct_answer(runtime: ModelRuntime, images: list[bytes], max_tokens: int) -> tuple[list[int], int]:
    """Greedy ids (and prompt tokens) of QUESTION about `images` with the model's own chat template."""
    from agent.wire.worker import ChatMessage

    tags = "".join(runtime.image_tag.format(n=n) for n in range(1, len(images) + 1)) if runtime.image_tag else ""
    prompt = runtime.apply_chat_template([ChatMessage(role="user", content=tags + QUESTION)])
    generation = runtime.start_with_images(prompt, images, SamplingOptions(temperature=0.0, max_tokens=max_tokens))
    ids: list[int] = []
    while not generation.is_done:
        ids += generation.step().token_ids
    generation.release()
    return ids, len(generation.prompt_ids)


def test_models_say_which_take_images(vision_server: ServerThread, smollm2_api: ServerThread) -> None:
    vision = requests.get(f"{vision_server.url}/v1/models", timeout=10).json()["data"]
    text = requests.get(f"{smollm2_api.url}/v1/models", timeout=10).json()["data"]
    assert [m["input_modalities"] for m in vision] == [["text", "image"]]
    assert {tuple(m["input_modalities"]) for m in text} == {("text",)}


def test_two_pictures_get_the_answers_the_runtime_gives(client: openai.OpenAI, direct: ModelRuntime) -> None:
    answers = {}
    for name, png in (("red", RED), ("blue", BLUE)):
        reply = client.chat.completions.create(model="tiny-phi3v", messages=image_message(data_url(png)),
                                               max_tokens=12, temperature=0, logprobs=True)
        expected_ids, prompt_tokens = _direct_answer(direct, [png], 12)
        assert reply.usage.prompt_tokens == prompt_tokens > 1900  # the image's placeholder tokens count
        assert reply.choices[0].message.content == direct.decode(expected_ids)
        answers[name] = reply.choices[0].message.content
    assert answers["red"] != answers["blue"]  # the model saw the pictures


def test_a_jpeg_a_streamed_answer_and_two_images_in_one_request(client: openai.OpenAI, direct: ModelRuntime) -> None:
    from PIL import Image

    jpeg = io.BytesIO()
    Image.open(io.BytesIO(BLUE)).save(jpeg, format="JPEG", quality=95)
    chunks = client.chat.completions.create(model="tiny-phi3v", messages=image_message(
        data_url(jpeg.getvalue(), "image/jpeg"), data_url(RED)), max_tokens=8, temperature=0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # The server re-encodes every image as PNG: a JPEG of flat blue decodes to (nearly) the same pixels.
    png_again = io.BytesIO()
    Image.open(io.BytesIO(jpeg.getvalue())).convert("RGB").save(png_again, format="PNG")
    expected_ids, _ = _direct_answer(direct, [png_again.getvalue(), RED], 8)
    assert streamed == direct.decode(expected_ids)


def test_a_file_in_the_image_folder_and_nothing_outside_it(client: openai.OpenAI, images_dir: Path,
                                                           direct: ModelRuntime) -> None:
    reply = client.chat.completions.create(model="tiny-phi3v", messages=image_message(
        (images_dir / "red.png").as_uri()), max_tokens=6, temperature=0)
    assert reply.choices[0].message.content == direct.decode(_direct_answer(direct, [RED], 6)[0])
    (images_dir.parent / "secret.png").write_bytes(RED)
    for url in ("../secret.png", (images_dir.parent / "secret.png").as_uri(), "/etc/passwd"):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="tiny-phi3v", messages=image_message(url), max_tokens=4)
        assert "messages.0.content.0.image_url.url" in str(refused.value)
        assert "outside the image folder" in str(refused.value) or "not a regular file" in str(refused.value)


def _truncated_png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.effect_noise((64, 48), 80).convert("RGB").save(out, format="PNG")  # noise: cutting it cuts pixels
    return out.getvalue()[: len(out.getvalue()) // 2]


def _huge_png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 100
    Image.new("L", (side, side), 0).save(out, format="PNG")  # one colour: a small file of many pixels
    return out.getvalue()


@pytest.mark.parametrize(("url", "message"), [
    ("https://example.com/cat.png", "remote images are not fetched"),
    ("data:image/png;base64,not base64!", "not valid base64"),
    ("data:image/png,rawbytes", "must be base64"),
    (data_url(b"this is not an image at all"), "not one this server reads"),
    (data_url(_truncated_png()), "damaged or truncated"),
    (data_url(_huge_png()), "pixels, over"),
], ids=["remote", "bad-base64", "not-base64", "not-an-image", "truncated", "decompression-bomb"])
def test_an_unusable_image_is_a_400_naming_the_part_and_the_worker_keeps_serving(
        client: openai.OpenAI, tiny_phi3v: Path, url: str, message: str) -> None:
    workers_before = [w.pid for w in model_workers(os.getpid(), str(tiny_phi3v))]
    assert workers_before
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny-phi3v", messages=image_message(url), max_tokens=4)
    assert message in str(refused.value)
    assert refused.value.body["param"] == "messages.0.content.0.image_url.url"
    reply = client.chat.completions.create(model="tiny-phi3v", messages=image_message(data_url(RED)), max_tokens=2)
    assert reply.choices[0].finish_reason == "length"
    assert [w.pid for w in model_workers(os.getpid(), str(tiny_phi3v))] == workers_before  # none was lost


def test_too_many_images_other_part_types_and_a_text_model(client: openai.OpenAI,
                                                           smollm2_openai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny-phi3v", messages=image_message(
            *[data_url(RED)] * (MAX_IMAGES + 1)), max_tokens=4)
    assert refused.value.body["code"] == "too_many_images"
    assert refused.value.body["param"] == f"messages.0.content.{MAX_IMAGES}"
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny-phi3v", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}])
    assert refused.value.body["param"] == "messages.0.content.0.type"
    # A text-only model never drops an image silently.
    with pytest.raises(openai.BadRequestError) as refused:
        smollm2_openai.chat.completions.create(model="default", messages=image_message(data_url(RED)), max_tokens=4)
    assert refused.value.body["code"] == "unsupported_content"
    assert "reads text only" in str(refused.value)


def test_edge_agent_prompt_image_through_the_api_and_in_process(vision_server: ServerThread, tiny_phi3v: Path,
                                                                images_dir: Path, direct: ModelRuntime,
                                                                smollm2_int4_raw: Path) -> None:
    import subprocess
    import sys

    from testkit.env import subprocess_env

    expected = direct.decode(_direct_answer(direct, [RED], 6)[0])
    picture = str(images_dir / "red.png")
    for source in (["--url", vision_server.url], ["--model", str(tiny_phi3v), "--threads", "2"]):
        done = subprocess.run([sys.executable, "-m", "agent.cli", "prompt", QUESTION, "--image", picture,
                               "--max-tokens", "6", *source], capture_output=True, text=True, timeout=120,
                              env=subprocess_env())
        assert done.returncode == 0, done.stderr
        assert done.stdout == expected + "\n", source
    refused = subprocess.run([sys.executable, "-m", "agent.cli", "prompt", QUESTION, "--image", picture,
                              "--model", str(smollm2_int4_raw)], capture_output=True, text=True, timeout=120,
                             env=subprocess_env())
    assert refused.returncode != 0 and "reads text only: leave out --image" in refused.stderr
    missing = subprocess.run([sys.executable, "-m", "agent.cli", "prompt", QUESTION, "--image", picture + ".nope",
                              "--url", vision_server.url], capture_output=True, text=True, timeout=60,
                             env=subprocess_env())
    assert missing.returncode != 0 and "cannot read --image" in missing.stderr
