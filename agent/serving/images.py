"""Images in a prompt, from OpenAI's `image_url` content parts to the PNG bytes the model worker
gets (API process side).

Every image is decoded here with Pillow and re-encoded as a PNG before it reaches the worker:
onnxruntime-extensions decodes what it is given in the worker's process, and a file that is
not a whole JPEG or PNG makes its decoder end that process (measured with 0.18: "Not a JPEG
file", exit). So the worker only ever sees PNGs Pillow wrote, and a hostile image costs a 400
here. The size is read from the header before any pixel is decoded (a small file can claim
gigapixels), and nothing is fetched from the network.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from pathlib import Path
from urllib.parse import unquote, urlsplit

from agent.wire.errors import ImageError
from agent.wire.worker import MAX_PROMPT_IMAGES

MAX_IMAGES = MAX_PROMPT_IMAGES  # per request: what the worker's wire takes
# An encoded image, as sent (after base64) or read from the image folder.
MAX_IMAGE_BYTES = 16 << 20
# Width x height: a 4,000 x 4,000 photo; 48 MB of RGB while it is converted.
MAX_IMAGE_PIXELS = 16_000_000
_FORMATS = "PNG, JPEG, GIF, WebP or BMP"


def read_file_inside(root: Path, path: str, max_bytes: int, what: str) -> bytes:
    """The bytes of `path` (relative to `root`, or absolute), which must be a regular file inside
    `root` (after symlinks) of at most `max_bytes`.

    Raises:
        ImageError: outside `root`, not a regular file, unreadable, or too large.
    """
    base = root.resolve()
    target = (base / path).resolve()
    if not target.is_relative_to(base):
        raise ImageError(f"{what} {path!r} is outside the image folder {base}")
    if not target.is_file():
        raise ImageError(f"{what} {path!r} is not a regular file in {base}")
    return read_bounded(target, max_bytes, what, shown=path)


def read_bounded(path: Path, max_bytes: int, what: str, shown: str | None = None) -> bytes:
    """The bytes of the file `path`, at most `max_bytes` (`shown`: how messages name it).

    Raises:
        ImageError: unreadable or too large.
    """
    name = repr(shown if shown is not None else str(path))
    try:
        if path.stat().st_size > max_bytes:
            raise ImageError(f"{what} {name} is over {max_bytes} bytes: send a smaller one")
        data = path.read_bytes()
    except OSError as e:
        raise ImageError(f"cannot read {what} {name}: {e.strerror or e}") from e
    if len(data) > max_bytes:  # it grew since stat()
        raise ImageError(f"{what} {name} is over {max_bytes} bytes: send a smaller one")
    return data


def image_url_bytes(url: str, image_dir: Path | None) -> bytes:
    """The encoded image an `image_url.url` carries: a `data:` URL (base64), or with `image_dir` a
    `file://` URL or path inside it. Remote URLs are refused, never fetched.

    Raises:
        ImageError: any other URL, bad base64, a file outside `image_dir`, or too many bytes.
    """
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ImageError("a data: URL must be base64 (data:image/png;base64,...)")
        if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
            raise ImageError(f"the image is over {MAX_IMAGE_BYTES} bytes: send a smaller one")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ImageError(f"the data: URL is not valid base64 ({e})") from e
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("http", "https", "ftp"):
        raise ImageError("remote images are not fetched: send the image inline as a data: URL "
                         "(data:image/png;base64,...)")
    if image_dir is None:
        raise ImageError("only data: URLs are accepted: send the image inline (data:image/png;base64,...); "
                         "local files are read only when the server has an image folder (serve --image-dir)")
    if scheme == "file":
        path = unquote(urlsplit(url).path)
    elif scheme == "":
        path = url
    else:
        raise ImageError(f"{scheme}: URLs are not accepted: send a data: URL or a file in the image folder")
    return read_file_inside(image_dir, path, MAX_IMAGE_BYTES, "the image file")


def to_png(data: bytes) -> bytes:
    """`data` (an encoded image) decoded and written again as an RGB PNG.

    Raises:
        ImageError: not an image Pillow reads, larger than MAX_IMAGE_PIXELS, or damaged.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:  # reads the header only
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise ImageError(f"the image is {width} x {height} pixels, over {MAX_IMAGE_PIXELS:,}: "
                                     "send a smaller one")
                image.load()
                out = io.BytesIO()
                image.convert("RGB").save(out, format="PNG", compress_level=1)
    except ImageError:
        raise
    except UnidentifiedImageError as e:
        raise ImageError(f"the image is not one this server reads ({_FORMATS})") from e
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning,
            EOFError) as e:
        raise ImageError(f"the image is damaged or truncated ({str(e)[:120]}): send a whole {_FORMATS} file") from e
    return out.getvalue()
