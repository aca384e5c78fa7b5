"""`imgprep sample`: a small ILSVRC12-shaped tree made from the bundled photos, or the same images
as the ILSVRC2012 download (a train tar of per-class tars, a flat val tar, the devkit tar.gz).

Images are crops of the photos at ImageNet-like sizes (about 500x375, some portrait, some
large) and JPEG qualities; each class is one photo with a tint of its own, so that a tiny
network can learn the classes. The photos are assigned to the classes arbitrarily (class k of
the synsets picked gets photo k): a cup labelled "academic gown" is the sample's label, not a
wrong one. The photos are upscaled, so the files are smoother (about 50 KB)
than real ones; `grain` adds sensor-like noise, and 8 gives about ImageNet's file size and
decoding cost (about 100 KB), which is what the benchmarks use. With `oddities=True` the train
set also holds the files real ImageNet throws at a tool: CMYK JPEG, PNG named .JPEG,
RGBA PNG, EXIF-rotated JPEG, truncated JPEG, zero-byte file, random bytes named .JPEG.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import random
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from imgprep import ImgprepError
from imgprep.formats.lists import load_synset_words, load_synsets
from imgprep.prepare.make_lists import DEVKIT_GROUND_TRUTH, KAGGLE_SOLUTION
from imgprep.prepare.download import DEVKIT_TAR, TRAIN_TAR, VAL_TAR
from imgprep.prepare.progress import Progress, plural

PHOTOS_DIR = Path(__file__).parent.parent / "data" / "photos"
ID_TABLE_NAME = "ILSVRC2012_id_to_wnid.csv"
DEVKIT_DATA = "ILSVRC2012_devkit_t12/data"
ARCHIVE_MTIME = 1_338_508_800  # 2012-06-01: fixed, so that the same seed gives the same archives
# Oddity kind -> what a build must do with it.
ODDITY_OUTCOMES = {
    "cmyk": "converted", "png_named_jpeg": "converted", "rgba_png": "converted",
    "exif_rotated": "converted", "truncated": "failed", "zero_byte": "failed",
    "random_bytes": "failed",
}


@dataclass
class Sample:
    """What `make_sample` wrote: its root, the classes' wnids, the image counts and the oddities."""

    root: Path
    wnids: list[str]
    train: int = 0
    val: int = 0
    oddities: dict[str, str] = field(default_factory=dict)  # train-relative path -> kind


def photo_paths() -> list[Path]:
    """The bundled photos the sample's images are cut from."""
    photos = sorted(PHOTOS_DIR.glob("*.jpg"))
    if not photos:
        raise ImgprepError(f"no bundled photos in {PHOTOS_DIR}; is the package installed completely?")
    return photos


def devkit_ids(wnids_all: list[str]) -> dict[str, int]:
    """wnid -> ILSVRC2012_ID (1..1000), in the devkit's order rather than the sorted one, so that a
    tool that takes ILSVRC2012_ID - 1 for Caffe's label is caught."""
    """A fixed ILSVRC2012_ID for each wnid that differs from the sorted order, as the devkit's does."""
    order = list(wnids_all)
    random.Random(2012).shuffle(order)
    return {w: i + 1 for i, w in enumerate(order)}


def _sample_size(rng: random.Random) -> tuple[int, int]:
    kind = rng.random()
    if kind < 0.65:
        return rng.choice([(500, 375), (500, 333), (500, 400), (480, 360), (500, 500)])
    if kind < 0.9:
        return rng.choice([(375, 500), (333, 500), (400, 500)])
    return rng.choice([(1024, 768), (800, 1200), (1280, 853)])


def _render(photo: Image.Image, tint: tuple[float, float, float], rng: random.Random,
            grain: float = 0.0) -> Image.Image:
    w, h = _sample_size(rng)
    pw, ph = photo.size
    scale = rng.uniform(0.6, 1.0) * min(pw / w, ph / h)
    cw, ch = max(1, int(w * scale)), max(1, int(h * scale))
    x, y = rng.randint(0, pw - cw), rng.randint(0, ph - ch)
    img = photo.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BILINEAR)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if img.mode == "RGB":
        bands = [b.point(lambda v, f=f: min(255, int(v * f))) for b, f in zip(img.split(), tint)]
        img = Image.merge("RGB", bands)
    if grain:
        pixels = np.asarray(img, np.float32)
        pixels += np.random.default_rng(rng.getrandbits(64)).standard_normal(pixels.shape, np.float32) * grain
        img = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), img.mode)
    return img


def _jpeg_bytes(img: Image.Image, rng: random.Random, **extra) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=rng.randint(75, 97), subsampling=rng.choice([0, 2]), **extra)
    return buf.getvalue()


def _oddity_bytes(kind: str, img: Image.Image, rng: random.Random) -> bytes:
    rgb = img.convert("RGB")
    buf = io.BytesIO()
    if kind == "cmyk":
        rgb.convert("CMYK").save(buf, "JPEG", quality=90)
    elif kind == "png_named_jpeg":
        rgb.save(buf, "PNG")
    elif kind == "rgba_png":
        rgba = rgb.convert("RGBA")
        rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
        rgba.save(buf, "PNG")
    elif kind == "exif_rotated":
        # Pixels stored rotated, with EXIF orientation 6 telling viewers to turn them upright.
        exif = Image.Exif()
        exif[0x0112] = 6
        rgb.transpose(Image.ROTATE_90).save(buf, "JPEG", quality=92, exif=exif.tobytes())
    elif kind == "truncated":
        full = _jpeg_bytes(rgb, rng)
        return full[: len(full) * 3 // 5]
    elif kind == "zero_byte":
        return b""
    elif kind == "random_bytes":
        return rng.randbytes(5000)
    else:
        raise ValueError(kind)
    return buf.getvalue()


def make_sample(out: str | os.PathLike, classes: int = 10, train_per_class: int = 20,
                val_per_class: int = 5, seed: int = 0, oddities: bool = False, grain: float = 0.0,
                archives: bool = False, show_progress: bool = True) -> Sample:
    """Writes ROOT/train/<wnid>/<wnid>_<n>.JPEG, flat ROOT/val/ILSVRC2012_val_%08d.JPEG and the
    val labels in three forms: devkit ground truth + ID table, and Kaggle's solution CSV. With
    `archives`, ROOT holds the same images as the three ILSVRC2012 downloads instead (see
    `write_download`). Progress (count, rate, ETA) and a summary line go to stderr unless
    `show_progress` is False."""
    progress = Progress("sample", None, enabled=show_progress)
    if archives:
        root = Path(out)
        if any((root / name).exists() for name in (TRAIN_TAR, VAL_TAR, DEVKIT_TAR)):
            raise ImgprepError(f"{root} already holds ILSVRC2012 archives; choose an empty folder")
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root, prefix=".sample-") as tree:
            sample = _make_tree(Path(tree) / "tree", classes, train_per_class, val_per_class, seed, oddities, grain,
                                progress)
            write_download(sample.root, root)
            for name in ("ODDITIES.txt", "PHOTO-LICENSES.md"):
                if (sample.root / name).exists():
                    shutil.copy(sample.root / name, root / name)
        sample.root = root
    else:
        sample = _make_tree(Path(out), classes, train_per_class, val_per_class, seed, oddities, grain, progress)
    progress.finish(f"sample: {plural(sample.train, 'train image')} ({plural(len(sample.oddities), 'oddity', 'oddities')}) "
                    f"and {plural(sample.val, 'val image')} in {plural(classes, 'class', 'classes')} in "
                    f"{progress.elapsed:.1f}s ({progress.rate:,.0f} img/s) -> {sample.root}")
    return sample


def _make_tree(root: Path, classes: int, train_per_class: int, val_per_class: int, seed: int, oddities: bool,
               grain: float, progress: Progress) -> Sample:
    """make_sample's tree, counting each image written on `progress`."""
    all_wnids = load_synsets()
    if not 1 <= classes <= len(all_wnids):
        raise ImgprepError(f"--classes must be between 1 and {len(all_wnids)}")
    if not 0 <= grain <= 64:
        raise ImgprepError(f"--grain must be between 0 and 64 (pixel standard deviation), not {grain}")
    rng = random.Random(seed)
    step = len(all_wnids) // classes
    wnids = [all_wnids[i * step] for i in range(classes)]
    if (root / "train").exists() or (root / "val").exists():
        raise ImgprepError(f"{root} already holds a train/ or val/ folder; choose an empty folder")
    photos = photo_paths()
    loaded = [Image.open(p) for p in photos]
    for im in loaded:
        im.load()
    sample = Sample(root, wnids)
    odd = len(ODDITY_OUTCOMES) if oddities else 0
    progress.total = classes * (train_per_class + val_per_class) + odd
    class_look = []
    for k in range(classes):
        tint = tuple(rng.uniform(0.7, 1.0) for _ in range(3))
        class_look.append((loaded[k % len(loaded)], tint))

    for k, wnid in enumerate(wnids):
        folder = root / "train" / wnid
        folder.mkdir(parents=True)
        photo, tint = class_look[k]
        for n in range(train_per_class):
            img = _render(photo, tint, rng, grain)
            (folder / f"{wnid}_{10000 + n}.JPEG").write_bytes(_jpeg_bytes(img, rng))
            sample.train += 1
            progress.update()
    if oddities:
        for j, kind in enumerate(ODDITY_OUTCOMES):
            wnid = wnids[j % classes]
            photo, tint = class_look[j % classes]
            rel = f"{wnid}/{wnid}_{90000 + j}.JPEG"
            (root / "train" / rel).write_bytes(_oddity_bytes(kind, _render(photo, tint, rng), rng))
            sample.oddities[rel] = kind
            sample.train += 1
            progress.update()
        (root / "ODDITIES.txt").write_text(
            "".join(f"train/{rel} {kind} {ODDITY_OUTCOMES[kind]}\n" for rel, kind in sample.oddities.items()))

    val_classes = [k for k in range(classes) for _ in range(val_per_class)]
    rng.shuffle(val_classes)
    (root / "val").mkdir(parents=True)
    ids = devkit_ids(all_wnids)
    truth, kaggle = [], ["ImageId,PredictionString"]
    for n, k in enumerate(val_classes, 1):
        photo, tint = class_look[k]
        stem = f"ILSVRC2012_val_{n:08d}"
        (root / "val" / f"{stem}.JPEG").write_bytes(_jpeg_bytes(_render(photo, tint, rng, grain), rng))
        truth.append(str(ids[wnids[k]]))
        kaggle.append(f"{stem},{wnids[k]} 0 0 10 10")
        progress.update()
        sample.val += 1
    (root / DEVKIT_GROUND_TRUTH).write_text("\n".join(truth) + "\n")
    (root / ID_TABLE_NAME).write_text(
        "ILSVRC2012_ID,WNID\n" + "".join(f"{i},{w}\n" for w, i in sorted(ids.items(), key=lambda t: t[1])))
    (root / KAGGLE_SOLUTION).write_text("\n".join(kaggle) + "\n")
    licences = PHOTOS_DIR / "LICENSES.md"
    (root / "PHOTO-LICENSES.md").write_text(licences.read_text(encoding="utf-8"), encoding="utf-8")
    return sample


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), ARCHIVE_MTIME, 0o644
    archive.addfile(info, io.BytesIO(data))


def meta_mat(ids: dict[str, int]) -> bytes:
    """The devkit's meta.mat as scipy writes it: the struct array `synsets` with the devkit's fields
    (here the 1000 leaf synsets only; the real file also holds 860 inner ones)."""
    from scipy.io import savemat

    words = load_synset_words()
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    synsets = np.zeros(len(ids), dtype=[(f, "O") for f in fields])
    for n, (wnid, devkit_id) in enumerate(sorted(ids.items(), key=lambda t: t[1])):
        synsets[n] = (devkit_id, wnid, words.get(wnid, wnid), "", 0, np.zeros((1, 0)), 0, 0)
    buf = io.BytesIO()
    savemat(buf, {"synsets": synsets})
    # the 116-byte text header names the time of writing; a fixed one keeps the archive reproducible
    return b"MATLAB 5.0 MAT-file, written by imgprep sample".ljust(116) + buf.getvalue()[116:]


def write_download(tree: Path, download: Path) -> None:
    """Packs an `imgprep sample` tree as the ILSVRC2012 download: ILSVRC2012_img_train.tar (one
    uncompressed tar per class, `<wnid>.tar` holding flat `<wnid>_<n>.JPEG`), ILSVRC2012_img_val.tar
    (flat JPEGs) and ILSVRC2012_devkit_t12.tar.gz (data/ILSVRC2012_validation_ground_truth.txt and
    data/meta.mat, written by scipy)."""
    tree, download = Path(tree), Path(download)
    download.mkdir(parents=True, exist_ok=True)
    with tarfile.open(download / TRAIN_TAR, "w", format=tarfile.GNU_FORMAT) as train:
        for class_dir in sorted((tree / "train").iterdir()):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w", format=tarfile.GNU_FORMAT) as per_class:
                for image in sorted(class_dir.iterdir()):
                    _add(per_class, image.name, image.read_bytes())
            _add(train, f"{class_dir.name}.tar", inner.getvalue())
    with tarfile.open(download / VAL_TAR, "w", format=tarfile.GNU_FORMAT) as val:
        for image in sorted((tree / "val").iterdir()):
            _add(val, image.name, image.read_bytes())
    with open(tree / ID_TABLE_NAME, newline="", encoding="utf-8") as f:
        ids = {wnid: int(devkit_id) for devkit_id, wnid in list(csv.reader(f))[1:]}
    with open(download / DEVKIT_TAR, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=ARCHIVE_MTIME) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as devkit:
        _add(devkit, f"{DEVKIT_DATA}/{DEVKIT_GROUND_TRUTH}", (tree / DEVKIT_GROUND_TRUTH).read_bytes())
        _add(devkit, f"{DEVKIT_DATA}/meta.mat", meta_mat(ids))
