"""agent.serving.images: what an image part may carry, checked before any pixel reaches a worker."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from PIL import Image

from agent.serving.images import (
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    ImageError,
    image_url_bytes,
    read_file_inside,
    to_png,
)


def _encoded(fmt: str, size: tuple[int, int] = (20, 10), mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, 128).save(out, format=fmt)
    return out.getvalue()


def _noise(fmt: str) -> bytes:
    """An image whose data does not compress away: cutting the file cuts its pixels."""
    out = io.BytesIO()
    Image.effect_noise((64, 64), 80).convert("RGB").save(out, format=fmt)
    return out.getvalue()


@pytest.mark.parametrize(("fmt", "mode"), [("PNG", "RGB"), ("JPEG", "RGB"), ("GIF", "P"), ("WEBP", "RGB"),
                                           ("BMP", "RGB"), ("PNG", "RGBA"), ("PNG", "L")])
def test_every_format_becomes_an_rgb_png_of_the_same_size(fmt: str, mode: str) -> None:
    png = to_png(_encoded(fmt, mode=mode))
    with Image.open(io.BytesIO(png)) as image:
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (20, 10))


def test_pixels_are_bounded_before_decoding() -> None:
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 1
    claim = _encoded("PNG", (side, side), "L")  # a small file of many pixels
    assert len(claim) < 1 << 20
    with pytest.raises(ImageError, match=f"{side} x {side} pixels, over"):
        to_png(claim)


@pytest.mark.parametrize(("data", "why"), [
    (b"", "not one this server reads"),
    (b"GIF89a" + b"\0" * 10, "not one this server reads|damaged"),
    (_noise("PNG")[: len(_noise("PNG")) // 2], "damaged or truncated"),
    (_noise("JPEG")[: len(_noise("JPEG")) // 2], "damaged or truncated"),
])
def test_damaged_and_foreign_bytes_are_refused(data: bytes, why: str) -> None:
    with pytest.raises(ImageError, match=why):
        to_png(data)


def test_data_urls_decode_and_everything_else_needs_a_folder(tmp_path: Path) -> None:
    png = _encoded("PNG")
    assert image_url_bytes("data:image/png;base64," + base64.b64encode(png).decode(), None) == png
    for url, why in [("data:image/png;base64,@@@", "not valid base64"), ("data:text/plain,hello", "must be base64"),
                     ("http://127.0.0.1/x.png", "not fetched"), ("HTTPS://example.com/x.png", "not fetched"),
                     ("ftp://example.com/x.png", "not fetched"), (str(tmp_path / "x.png"), "only data: URLs"),
                     ("file:///etc/passwd", "only data: URLs")]:
        with pytest.raises(ImageError, match=why):
            image_url_bytes(url, None)
    with pytest.raises(ImageError, match="over"):
        image_url_bytes("data:image/png;base64," + "A" * (MAX_IMAGE_BYTES * 4 // 3 + 8), None)


def test_files_must_be_regular_files_inside_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.png").write_bytes(b"png")
    (tmp_path / "outside.png").write_bytes(b"secret")
    (folder / "link.png").symlink_to(tmp_path / "outside.png")
    assert image_url_bytes((folder / "sub" / "a.png").as_uri(), folder) == b"png"
    assert image_url_bytes("sub/a.png", folder) == b"png"
    assert image_url_bytes("file://" + str(folder / "sub" / "a%2Epng").replace(".png", ""), folder) == b"png"
    for url, why in [("../outside.png", "outside the image folder"), ("link.png", "outside the image folder"),
                     ((tmp_path / "outside.png").as_uri(), "outside the image folder"),
                     ("sub", "not a regular file"), ("missing.png", "not a regular file"),
                     ("gopher://x/y", "gopher: URLs are not accepted")]:
        with pytest.raises(ImageError, match=why):
            image_url_bytes(url, folder)
    with pytest.raises(ImageError, match="over 2 bytes"):
        read_file_inside(folder, "sub/a.png", 2, "the image file")
