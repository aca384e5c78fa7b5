"""bench-loader's torchvision peer: the original image files through a `torch.utils.data.DataLoader`
whose workers decode with Pillow and apply torchvision's ImageNet transforms.

Real torchvision supplies the transforms where it imports. Where it does not (PyPI's torchvision
does not import beside every torch build), the same transforms run here in Pillow and torch, as
torchvision defines them for PIL images: Resize(256) (shorter side to 256, the longer to
int(256 * long / short), bilinear with Pillow's antialiasing), RandomCrop(224) / CenterCrop(224),
RandomHorizontalFlip(), or RandomResizedCrop(224) (scale 0.08-1, ratio 3/4-4/3, 10 tries, then
the center crop), then ToTensor() and Normalize(mean, std).
"""

from __future__ import annotations

import io
import math
import os
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from imgprep import ImgprepError
from imgprep.formats.files import NotRegular, file_kind, open_regular, read_regular, require_regular

# torchvision.datasets.folder.IMG_EXTENSIONS
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def image_files(root: Path, list_file: Path | None = None) -> list[tuple[str, int]]:
    """(path, label) of the images a torchvision ImageFolder finds under root (class folders,
    sorted, regular files only), or of a 'path label' list's entries under root. The list and each
    entry there must be a regular file (a FIFO would block DALI's reader and the DataLoader forever);
    an entry that is not is an ImgprepError, a missing one is left to the readers to report."""
    if list_file is not None:
        from imgprep.formats.lists import read_list

        require_regular(list_file)
        entries = read_list(list_file)
        samples = [(str(root / p), int(label)) for p, label in zip(entries.paths, entries.labels)]
        for path, _ in samples:
            try:
                kind = file_kind(os.stat(path).st_mode)
            except OSError:
                continue
            if kind:
                raise NotRegular(path, kind)
        return samples
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    return [(str(path), label) for label, name in enumerate(classes)
            for path in sorted((root / name).rglob("*"))
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()]


# Where a whole file of each format ends: a file without it in its last TAIL bytes was cut short.
END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}
TAIL = 4096


def original_fault(path: str) -> str | None:
    """Why the peers cannot read the image file at `path`, in the words of build-lmdb's failure report
    ('missing', 'empty', 'unreadable': not an image Pillow knows, 'truncated': a JPEG or PNG without
    its end), or None. Reads the header and the last few KB, not the pixels: quick enough for a tree
    of a million files, so that a file that would stop DALI's reader or a DataLoader worker is skipped."""
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return "empty"
            try:
                with Image.open(f) as img:
                    kind, (w, h) = img.format, img.size
            except Exception:  # Pillow raises many kinds for bytes it does not know
                return "unreadable"
            if w < 1 or h < 1:
                return "unreadable"
            if kind in END_MARKERS:
                f.seek(max(0, size - TAIL))
                if END_MARKERS[kind] not in f.read():
                    return "truncated"
    except FileNotFoundError:
        return "missing"
    except NotRegular:
        return "not-a-file"
    except OSError:
        return "unreadable"
    return None


def readable_originals(samples: list[tuple[str, int]], threads: int = 8) -> tuple[list[tuple[str, int]], Counter]:
    """(the samples whose file `original_fault` passes, the skipped files counted by reason), checked
    on `threads` threads (the checks wait on the disk more than on the CPU)."""
    with ThreadPoolExecutor(max(1, threads)) as pool:
        faults = list(pool.map(original_fault, [path for path, _ in samples], chunksize=64))
    kept = [sample for sample, fault in zip(samples, faults) if fault is None]
    return kept, Counter(fault for fault in faults if fault)


def describe_skipped(skipped: Counter) -> str:
    """'skipped 3 unreadable files (empty 1, truncated 1, unreadable 1)', or '' when none was."""
    total = sum(skipped.values())
    if not total:
        return ""
    reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items()))
    return f"skipped {total} unreadable file{'s' if total > 1 else ''} ({reasons})"


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """torchvision's Resize(size) on a PIL image."""
    w, h = img.size
    short, long = min(w, h), max(w, h)
    if short == size:
        return img
    new_short, new_long = size, int(size * long / short)
    return img.resize((new_short, new_long) if w <= h else (new_long, new_short), Image.BILINEAR)


def center_box(w: int, h: int, size: int) -> tuple[int, int, int, int]:
    """torchvision's CenterCrop(size) window as Pillow's (left, top, right, bottom)."""
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return left, top, left + size, top + size


def random_box(w: int, h: int, size: int, rng: random.Random) -> tuple[int, int, int, int]:
    """torchvision's RandomCrop(size) window."""
    top, left = rng.randint(0, h - size), rng.randint(0, w - size)
    return left, top, left + size, top + size


def random_resized_box(w: int, h: int, rng: random.Random, scale=(0.08, 1.0),
                       ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop window (before the resize to the output size)."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
            return left, top, left + cw, top + ch
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        cw, ch = int(round(h * max(ratio))), h
    else:
        cw, ch = w, h
    top, left = (h - ch) // 2, (w - cw) // 2
    return left, top, left + cw, top + ch


class PillowTransform:
    """torchvision's ImageNet transforms without torchvision: PIL image -> normalised CHW float32 tensor.
    Randomness comes from Python's `random`, which DataLoader seeds in each worker (as torch's RNG)."""

    def __init__(self, train: bool, resized_crop: bool, mean_rgb, std_rgb, size: int = 224, shorter: int = 256):
        """The training (random crop, or RandomResizedCrop with `resized_crop`) or evaluation (center crop)
        transform to `size`, after resizing the shorter side to `shorter`; mean and std in 0..255 RGB."""
        self.train, self.resized_crop, self.size, self.shorter = train, resized_crop, size, shorter
        self.mean = np.asarray(mean_rgb, np.float32) / 255
        self.std = np.asarray(std_rgb, np.float32) / 255

    def __call__(self, img: Image.Image):
        """The normalised CHW float32 tensor of `img` (an RGB PIL image)."""
        import torch

        if self.train and self.resized_crop:
            img = img.crop(random_resized_box(*img.size, random)).resize((self.size, self.size), Image.BILINEAR)
        elif self.train:
            img = resize_shorter(img, self.shorter)
            img = img.crop(random_box(*img.size, self.size, random))
        else:
            img = resize_shorter(img, self.shorter)
            img = img.crop(center_box(*img.size, self.size))
        if self.train and random.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        tensor = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div_(255)
        mean, std = torch.from_numpy(self.mean)[:, None, None], torch.from_numpy(self.std)[:, None, None]
        return tensor.sub_(mean).div_(std)


def torchvision_transform(train: bool, resized_crop: bool, mean_rgb, std_rgb):
    """torchvision's own Compose of the same transforms, or None where torchvision does not import."""
    try:
        from torchvision import transforms
    except Exception:  # absent, or built for another torch
        return None
    if train and resized_crop:
        steps = [transforms.RandomResizedCrop(224)]
    else:
        steps = [transforms.Resize(256), transforms.RandomCrop(224) if train else transforms.CenterCrop(224)]
    if train:
        steps.append(transforms.RandomHorizontalFlip())
    return transforms.Compose(steps + [transforms.ToTensor(),
                                       transforms.Normalize([m / 255 for m in mean_rgb], [s / 255 for s in std_rgb])])


class ImageFiles:
    """Map-style dataset of (path, label): torchvision's default loader (Pillow, RGB), then `transform`."""

    def __init__(self, samples: list[tuple[str, int]], transform):
        """`samples`: (path, label) pairs, at least one; `transform`: PIL image -> tensor."""
        if not samples:
            raise ImgprepError("no images to read")
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        """The number of images."""
        return len(self.samples)

    def __getitem__(self, index: int):
        """(transformed image, label) of sample `index`; an ImgprepError naming a file Pillow cannot read."""
        path, label = self.samples[index]
        try:
            data = read_regular(path)  # a regular file only, even if the path changed since it was listed
            with Image.open(io.BytesIO(data)) as img:
                img = img.convert("RGB")
        except (OSError, ValueError) as e:  # what torchvision's loader would raise, with the file named
            raise ImgprepError(f"Pillow cannot read {path}: {e}") from None
        return self.transform(img), label
