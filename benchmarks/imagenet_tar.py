"""A synthetic ILSVRC2012_img_train.tar: 1,000 class tars (n01440764.tar, ...) inside one tar, as the
download is, holding tiny JPEGs, and its train.txt; made once per size and reused.

Members are ~1 KB 16x16 JPEGs (a pool of distinct ones, reused under ImageNet-style names
`<wnid>_<k>.JPEG`), so a build of them measures imgprep's per-record work: the list, the order, the
archive lookup and read, opening and checking each image, the hand-back and the writer.
"""

from __future__ import annotations

import io
import os
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from imgprep.formats.lists import load_synsets

IMAGENET_TRAIN = 1_281_167
POOL = 256
SIDE = 16


def _pool() -> list[bytes]:
    """POOL distinct 16x16 JPEGs of about 1 KB (noise at q95 keeps them from compressing to nothing)."""
    rng = np.random.default_rng(0)
    images = []
    for _ in range(POOL):
        pixels = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buf, "JPEG", quality=95)
        images.append(buf.getvalue())
    return images


def _member(name: str, data: bytes, mtime: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o644
    return info.tobuf(tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def class_counts(members: int, classes: int) -> list[int]:
    """Members per class: as even as the total allows (ImageNet's own vary from 732 to 1,300)."""
    base, extra = divmod(members, classes)
    return [base + (k < extra) for k in range(classes)]


def make_train_tar(folder: Path, members: int = IMAGENET_TRAIN, classes: int = 1000) -> tuple[Path, Path, float]:
    """(the tar, its train.txt, seconds taken to make them: 0 when already there)."""
    folder.mkdir(parents=True, exist_ok=True)
    tar_path = folder / f"ILSVRC2012_img_train-{members}.tar"
    list_path = folder / f"train-{members}.txt"
    if tar_path.exists() and list_path.exists():
        return tar_path, list_path, 0.0
    start = time.perf_counter()
    pool = _pool()
    wnids = load_synsets()[:classes]
    mtime = 1_338_000_000
    lines = []
    partial = tar_path.with_suffix(".partial")
    with open(partial, "wb") as out:
        k = 0
        for label, (wnid, count) in enumerate(zip(wnids, class_counts(members, classes))):
            inner = []
            for j in range(count):
                name = f"{wnid}_{j}.JPEG"
                inner.append(_member(name, pool[k % POOL], mtime))
                lines.append(f"{wnid}/{name} {label}\n")
                k += 1
            body = b"".join(inner) + b"\0" * (2 * tarfile.BLOCKSIZE)
            out.write(_member(f"{wnid}.tar", body, mtime))
        out.write(b"\0" * (2 * tarfile.BLOCKSIZE))
    os.replace(partial, tar_path)
    list_path.write_text("".join(lines))
    return tar_path, list_path, time.perf_counter() - start
