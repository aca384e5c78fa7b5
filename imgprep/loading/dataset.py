"""A plain PyTorch data source: a map-style `torch.utils.data.Dataset` over imgprep's and Caffe's
LMDB/LevelDB databases, for trainers without DALI (or without a GPU that DALI supports).

It applies the DALI loader's policies with Pillow(-SIMD) and numpy: training "caffe" = shorter side
to 256 (skipped when a record already has it), a random 224x224 crop, a random horizontal mirror
(p = 0.5), or "inception" = torchvision's RandomResizedCrop(224, scale (0.08, 1), ratio (3/4, 4/3))
window of the stored image (`draws.resized_crop_windows`), resized to 224x224 (Pillow bilinear), and
the mirror; evaluation "center" = shorter side to 256 and the center 224x224 crop. Then a normalisation as
`Loader` takes it ("imagenet", "none", (mean_rgb, std_rgb) in 0..255, or a `.binaryproto` mean:
a stored-size mean is subtracted at the source pixel before crop and mirror, as stock Caffe does;
a crop-sized mean at the output position, as caffe-pro does). Items are (CHW float32 RGB tensor,
int label); torch's default collate makes the labels int64.

The transforms are pure functions of (record, policy, draw) below; `CaffeDataset` adds the I/O.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imgprep import ImgprepError
from imgprep.formats.codec import Datum, RecordError, decode_datum
from imgprep.formats.imageops import ImageFailure, ImageSpec, bgr_chw_to_rgb_hwc, center_crop, decode_upright
from imgprep.formats.resizing import ResizePolicy
from imgprep.formats.database import database_info
from imgprep.formats.storage import Reader, detect_backend
from imgprep.loading.draws import augmentation, resized_crop_windows
from imgprep.loading.options import OptionError, check_pixels, whole
from imgprep.loading.policies import Normalisation, Policy, parse_policy
from imgprep.loading.records import KeyIndex

LEVELDB_WORKERS = ("LevelDB allows one process at a time, and each DataLoader worker is a process: use "
                   "num_workers=0 or 1, or build the database with `imgprep build-lmdb --backend lmdb` "
                   "(any number of processes can read an LMDB)")


@dataclass(frozen=True)
class Draw:
    """One sample's augmentation: crop offsets as fractions in [0, 1) of the free room, and mirror."""

    y: float
    x: float
    mirror: bool


def draw(seed: int, epoch: int, index: int) -> Draw:
    """The augmentation of record `index` in `epoch`: the loader's documented crop and mirror draws
    (`draws.augmentation`) at position `index`, so a pure function of its arguments, the same
    on every machine, process and numpy version."""
    crop_x, crop_y, mirror = augmentation(seed, epoch, np.array([index]))
    return Draw(float(crop_y[0]), float(crop_x[0]), bool(mirror[0]))


def record_image(datum: Datum, channels: int, resize_shorter: int | None) -> np.ndarray:
    """A record -> upright (H, W, C) uint8 RGB (C = 1 for gray databases), its shorter side
    resized to `resize_shorter` (Pillow bilinear, DCT-scaled decoding as build-lmdb) unless it has it
    already. Raw records are planar BGR; encoded ones are decoded whatever their channels field says."""
    gray = channels == 1
    policy = ResizePolicy("shorter", resize_shorter, resize_shorter) if resize_shorter else ResizePolicy("none")
    if datum.encoded:
        try:
            image = np.asarray(decode_upright(datum.data, ImageSpec(policy, gray=gray))[1])
        except ImageFailure as e:
            raise RecordError(f"the encoded image does not decode ({e})") from None
    else:
        image = bgr_chw_to_rgb_hwc(datum.pixels())
        height, width = image.shape[:2]
        size = policy.target_size(width, height)
        if size != (width, height):
            image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    return image[:, :, None] if image.ndim == 2 else image


def training_window(image: np.ndarray, crop: int, drawn: Draw) -> np.ndarray:
    """The drawn crop x crop window of an (H, W, ...) array, mirrored when drawn so."""
    height, width = image.shape[:2]
    if height < crop or width < crop:
        raise ImgprepError(f"image {width}x{height} is smaller than the {crop}x{crop} crop")
    top, left = int(drawn.y * (height - crop + 1)), int(drawn.x * (width - crop + 1))
    window = image[top:top + crop, left:left + crop]
    return window[:, ::-1] if drawn.mirror else window


def resized_crop(image: np.ndarray, policy: Policy, seed: int, epoch: int, index: int) -> np.ndarray:
    """The "inception" policy's window of an (H, W, C) uint8 image, drawn for record `index` of `epoch`
    (`draws.resized_crop_windows` at position `index`, within the policy's area and ratio), resized
    to crop x crop (Pillow bilinear)."""
    height, width = image.shape[:2]
    crop = policy.crop
    top, left, h, w = resized_crop_windows(seed, epoch, np.array([index]), [height], [width], policy.area,
                                           policy.ratio)[0].tolist()
    window = Image.fromarray(np.ascontiguousarray(image[top:top + h, left:left + w]).squeeze(-1) if image.shape[2] == 1
                             else np.ascontiguousarray(image[top:top + h, left:left + w]))
    resized = np.asarray(window.resize((crop, crop), Image.BILINEAR))
    return resized[:, :, None] if resized.ndim == 2 else resized


def apply_policy(image: np.ndarray, policy: Policy, norm: Normalisation, drawn: Draw) -> np.ndarray:
    """(H, W, C) uint8 RGB at the policy's size (stored size with a stored-size mean) -> the
    (C, crop, crop) float32 output: crop, mirror (training, unless the policy has mirror=False;
    "inception" has cropped already), normalise."""
    crop, at_source = policy.crop, norm.at_source(policy.crop)
    pixels = image
    if at_source:
        mean = _mean_rgb(norm.mean_image)
        if mean.shape != image.shape:
            raise ImgprepError(f"mean file is {mean.shape[1]}x{mean.shape[0]} but this record is "
                               f"{image.shape[1]}x{image.shape[0]}; Caffe needs the mean to match the records "
                               f"or the {crop}x{crop} crop")
        pixels = image.astype(np.float32) - mean
    drawn = drawn if policy.mirror else replace(drawn, mirror=False)
    window = training_window(pixels, crop, drawn) if policy.train else center_crop(pixels, crop)
    out = np.ascontiguousarray(window.transpose(2, 0, 1), dtype=np.float32)  # one pass: CHW float32
    if norm.mean_image is not None and not at_source:
        out -= norm.mean_image[::-1]  # caffe-pro: a crop-sized mean at the output position (BGR -> RGB)
    elif norm.mean_image is None:
        out -= np.asarray(norm.mean, np.float32)[:, None, None]
    out /= np.asarray(norm.std, np.float32)[:, None, None]
    return out


def _mean_rgb(mean_chw_bgr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(mean_chw_bgr[::-1].transpose(1, 2, 0), dtype=np.float32)


class CaffeDataset(torch.utils.data.Dataset):
    """Map-style Dataset over an LMDB or LevelDB of Caffe Datum records (imgprep's or Caffe's):
    item i is the record at position i in key order, as (CHW float32 RGB tensor, int label).

        dataset = CaffeDataset("train_lmdb", train=True)
        sampler = DistributedSampler(dataset)          # or shuffle=True without one
        loader = DataLoader(dataset, batch_size=256, sampler=sampler, num_workers=8)
        for epoch in range(90):
            sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            for images, labels in loader: ...

    Augmentation is reproducible: the crop and mirror of record i depend only on (seed, epoch, i)
    (`draw`; the "inception" window: `draws.resized_crop_windows` at position i), not on the worker or
    the order. `policy` takes what the loader's takes (`policies.parse_policy`), of the policies Pillow
follows here: "caffe" (the default for training), "inception", or "center" (the default for
evaluation), by name or as a `policies.Policy` (`policy("caffe", mirror=False)`); the others, and
PCA lighting, are the DALI loader's.
    Call `set_epoch(e)` before each epoch; the epoch lives in shared memory, so workers see it,
    persistent ones included.

    Each process opens its own database handle on first use (DataLoader workers after the fork).
    LevelDB allows one process at a time: with it use num_workers=0 or 1 (more give a clear error;
    after reading items in this process, `close()` before a 1-worker DataLoader: otherwise the worker
    says so), or build an LMDB. Bad arguments are `imgprep.loading.options.OptionError`s, as the loader's.
    A build that is not complete (`imgprep-build.json` state other than complete) is refused unless
    `allow_partial=True`.
    """

    def __init__(self, db, *, train: bool = True, crop: int = 224, resize_shorter: int = 256,
                 normalize="imagenet", seed: int = 0, allow_partial: bool = False, policy: str | Policy | None = None):
        self.path = Path(db)
        self.backend = detect_backend(self.path)
        name = policy.name if isinstance(policy, Policy) else policy or ("caffe" if train else "center")
        if name not in (("caffe", "inception") if train else ("center",)):
            raise OptionError(f"CaffeDataset follows the caffe and inception training policies and the center "
                              f"evaluation policy, not {name!r} with train={train}; the DALI loader has them all")
        self.policy = parse_policy(policy, train, crop, resize_shorter)
        if self.policy.lighting:
            raise OptionError("CaffeDataset has no PCA lighting; the DALI loader has it")
        self.norm = Normalisation.parse(normalize)
        self.seed = whole("seed", seed, 0)
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        with Reader(self.path, self.backend) as reader:
            self.keys = KeyIndex(reader.keys())
        # refuses a partial build unless allowed, an empty database and non-Datum records
        info = database_info(self.path, allow_partial=allow_partial, records=len(self.keys))
        self.channels = info.channels
        check_pixels(info, self.policy, self.norm)
        self._reader = None
        self._reader_pid = None

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def epoch(self) -> int:
        """The epoch whose augmentation items get (`set_epoch`)."""
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose augmentation the next items get (shared with the DataLoader's workers)."""
        self._epoch[0] = epoch

    def _open_here(self) -> Reader:
        """This process's handle: opened on first use, again in each forked worker."""
        pid = os.getpid()
        if self._reader is None or self._reader_pid != pid:
            worker = torch.utils.data.get_worker_info()
            if self.backend == "leveldb" and worker is not None and worker.num_workers > 1:
                raise ImgprepError(f"{self.path}: {LEVELDB_WORKERS}")
            self._reader = Reader(self.path, self.backend)  # the parent's handle stays the parent's
            self._reader_pid = pid
        return self._reader

    def __getitem__(self, index: int):
        if not 0 <= index < len(self.keys):
            raise IndexError(f"record {index} of {len(self.keys)}")
        key = self.keys[index]
        value = self._open_here().get(key)
        if value is None:
            raise ImgprepError(f"record {key[:60]!r} is no longer in {self.path}")
        try:
            datum = decode_datum(value)
            policy, epoch = self.policy, self.epoch
            inception = policy.name == "inception"  # RandomResizedCrop's window instead of shorter side + crop
            resize = None if self.norm.at_source(policy.crop) or inception else policy.resize_shorter
            image = record_image(datum, self.channels, resize)
            if inception:
                image = resized_crop(image, policy, self.seed, epoch, index)
            chw = apply_policy(image, policy, self.norm, draw(self.seed, epoch, index))
        except (RecordError, ImgprepError) as e:
            raise ImgprepError(f"record {key[:60]!r} of {self.path}: {e}") from None
        return torch.from_numpy(chw), datum.label

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_reader"] = state["_reader_pid"] = None  # a spawned worker opens its own
        return state

    def close(self) -> None:
        """Releases this process's handle (LevelDB allows one process at a time)."""
        if self._reader is not None and self._reader_pid == os.getpid():
            self._reader.close()
        self._reader = self._reader_pid = None
