"""Decode and resize time per image with the PIL build in use (pillow-simd or plain Pillow).

    python benchmarks/bench_pil.py DIR [--images 100] [--passes 5]

DIR is an `imgprep sample --grain 8` tree (ImageNet-sized JPEGs). Run it once in each environment
to compare builds; it needs only PIL and imgprep on the path.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

from PIL import Image

from imgprep.env import pil_build


def one_pass(datas: list[bytes]) -> tuple[float, float]:
    """(decode ms, resize-to-shorter-256 ms) per image."""
    decode = resize = 0.0
    for data in datas:
        start = time.perf_counter()
        img = Image.open(io.BytesIO(data)).convert("RGB")
        decoded = time.perf_counter()
        scale = 256 / min(img.size)
        img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR)
        decode += decoded - start
        resize += time.perf_counter() - decoded
    return decode * 1e3 / len(datas), resize * 1e3 / len(datas)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--passes", type=int, default=5)
    args = parser.parse_args()
    datas = [p.read_bytes() for p in sorted(args.dir.glob("train/*/*.JPEG"))[:args.images]]
    passes = [one_pass(datas) for _ in range(args.passes)]
    print(f"PIL {pil_build()['PIL']}")
    print(f"{len(datas)} images, median of {args.passes} passes: decode "
          f"{statistics.median(p[0] for p in passes):.2f} ms, resize to shorter 256 "
          f"{statistics.median(p[1] for p in passes):.2f} ms per image")


if __name__ == "__main__":
    main()
