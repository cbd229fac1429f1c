"""Benchmark: what an image part costs the API process before a worker sees it
(`agent.serving.images`: base64 decode, Pillow decode, RGB conversion, PNG re-encode), by
picture size and format, medians of n runs side by side in one run.

    python bench/images.py [-n 7]
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.serving.images import image_url_bytes, to_png  # noqa: E402
from agent.wire.errors import ImageError  # noqa: E402

SIZES = [("VGA 640x480", (640, 480)), ("1344x1008 (Phi-3.5-vision's 12 crops)", (1344, 1008)),
         ("12 MP photo 4000x3000", (4000, 3000))]


def _photo_like(size: tuple[int, int], fmt: str) -> bytes:
    """A picture with detail everywhere (noise over gradients), so the codecs do real work."""
    from PIL import Image

    noise = Image.effect_noise(size, 40).convert("RGB")
    gradient = Image.linear_gradient("L").resize(size).convert("RGB")
    out = io.BytesIO()
    Image.blend(noise, gradient, 0.8).save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=7, help="runs per case (after one warm-up)")
    args = parser.parse_args()
    print("| picture | format | encoded KiB | PNG to the worker KiB | ms (median) | ms (max) |")
    print("|---|---|---|---|---|---|")
    for label, size in SIZES:
        for fmt in ("JPEG", "PNG"):
            encoded = _photo_like(size, fmt)
            url = f"data:image/{fmt.lower()};base64," + base64.b64encode(encoded).decode()
            times, png = [], b""
            try:
                for i in range(args.n + 1):
                    t0 = time.perf_counter()
                    png = to_png(image_url_bytes(url, None))
                    if i:
                        times.append((time.perf_counter() - t0) * 1000)
            except ImageError as e:
                print(f"| {label} | {fmt} | {len(encoded) >> 10} | refused: {e} | | |")
                continue
            print(f"| {label} | {fmt} | {len(encoded) >> 10} | {len(png) >> 10} | {statistics.median(times):.0f}"
                  f" | {max(times):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
