"""The loader's policies: what happens to each record between the database and the trainer.

Training (each random part drawn per sample from (seed, epoch, position) by `draws`, handed to
DALI through `fn.external_source`, so restarts reproduce it):

- "caffe": shorter side to 256 (skipped where the records have it), a random 224x224 crop, a random
  mirror: Caffe's and caffe-pro's data layers.
- "resnet": He et al. (2016), section 3.4: the shorter side drawn uniformly from [256, 480], a random
  224x224 crop, a random mirror, and Krizhevsky's PCA lighting (alpha ~ N(0, 0.1)). Each part can be
  switched: `policy("resnet", scale=None, lighting=0.0, mirror=False)`.
- "inception": torchvision's RandomResizedCrop(224, scale=(0.08, 1), ratio=(3/4, 4/3)) and a random
  mirror (`draws.resized_crop_windows`).

Evaluation: "center" (shorter side 256, the center 224x224 crop) and "ten-crop" (shorter side 256,
the four corner crops and the center crop, then the same five mirrored: views ordered top-left,
top-right, bottom-left, bottom-right, center, and those five mirrored; each sample is a (10, C, H, W)
stack, or (10, H, W, C) for NHWC).

`graph.graph` builds the DALI graph of a policy; `batch_params` is the pure per-batch part the
loader's feed hands to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgprep import ImgprepError
from imgprep.formats.codec import load_mean
from imgprep.loading.draws import lighting, resized_crop_windows, shorter_sides
from imgprep.loading.draws import augmentation

TRAIN_POLICIES = ("caffe", "resnet", "inception")
EVAL_POLICIES = ("center", "ten-crop")
TEN_CROP_POSITIONS = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5))  # (x, y) as DALI's crop_pos
CHANNEL_ORDERS = ("RGB", "BGR")
IMAGENET_MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)  # torchvision's, in 0..255
IMAGENET_STD_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclass(frozen=True)
class Policy:
    """A policy by name with its parameters; `policy(name, **changes)` makes one."""

    name: str
    crop: int = 224
    resize_shorter: int = 256  # caffe, center, ten-crop: the shorter side before cropping
    scale: tuple[int, int] | None = None  # resnet: the shorter side's range; None: resize_shorter
    lighting: float = 0.0  # the standard deviation of the PCA lighting's alphas; 0: off
    mirror: bool = True  # training policies: a random horizontal mirror
    area: tuple[float, float] = (0.08, 1.0)  # inception: the crop's share of the image's area
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # inception: the crop's aspect ratio (width / height)

    @property
    def train(self) -> bool:
        """A training policy (random draws; the loader's `train=True`)."""
        return self.name in TRAIN_POLICIES

    @property
    def views(self) -> int:
        """Images per sample: 10 for "ten-crop", else 1."""
        return 10 if self.name == "ten-crop" else 1

    @property
    def largest_shorter_side(self) -> int | None:
        """The largest shorter side the policy resizes to (None: it crops the stored image)."""
        if self.name == "inception":
            return None
        return self.scale[1] if self.scale else self.resize_shorter

    def params(self) -> tuple[str, ...]:
        """The per-sample values the feed hands to the graph, in order."""
        names = ()
        if self.name in ("caffe", "resnet"):
            names = ("crop_x", "crop_y", "mirror")
        elif self.name == "inception":
            names = ("roi_start", "roi_end", "mirror")
        if self.scale:
            names += ("shorter",)
        if self.lighting:
            names += ("mean",)
        return names


_DEFAULTS = {"caffe": {}, "resnet": {"scale": (256, 480), "lighting": 0.1}, "inception": {},
             "center": {}, "ten-crop": {}}


def policy(name: str, **changes) -> Policy:
    """The named policy with its defaults, `changes` applied (e.g. `policy("resnet", lighting=0.0)`)."""
    if name not in _DEFAULTS:
        raise ImgprepError(f"unknown policy {name!r}: use one of {', '.join(_DEFAULTS)}")
    made = Policy(name, **{**_DEFAULTS[name], **changes})
    if made.scale is not None and name != "resnet":
        raise ImgprepError(f"scale augmentation is the 'resnet' policy's (policy('resnet', lighting=0.0) for it "
                           f"without lighting); {name!r} takes no scale")
    if made.scale is not None:
        low, high = made.scale
        if not made.crop <= low <= high:
            raise ImgprepError(f"scale {made.scale}: needs {made.crop} <= low <= high (the crop must fit)")
    if not made.train and (made.scale or made.lighting):
        raise ImgprepError(f"the {name!r} policy evaluates; scale and lighting are training augmentations")
    if made.lighting < 0:
        raise ImgprepError(f"lighting {made.lighting}: a standard deviation, >= 0")
    return made


def parse_policy(value, train: bool, crop: int = 224, resize_shorter: int = 256) -> Policy:
    """The loader's and the Dataset's `policy=` argument: None ("caffe" for training, "center" for
    evaluation), a name, or a Policy. A training policy needs train=True, an evaluation one train=False."""
    if value is None:
        value = "caffe" if train else "center"
    if isinstance(value, str):
        value = policy(value, crop=crop, resize_shorter=resize_shorter)
    if not isinstance(value, Policy):
        raise ImgprepError(f"policy must be a name ({', '.join(_DEFAULTS)}) or a policies.Policy, not {value!r}")
    if value.train != train:
        kind = "training" if value.train else "evaluation"
        raise ImgprepError(f"{value.name!r} is an {kind} policy: use it with train={value.train}")
    return value


def output_mean_std(norm, channels: int, channel_order: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std in the output's channel order (a mean image's paths subtract it
    apart: their per-channel mean is 0)."""
    mean = (0.0,) if norm.mean_image is not None else norm.mean
    mean = np.resize(np.asarray(mean, np.float64), channels)
    std = np.resize(np.asarray(norm.std, np.float64), channels)
    if channel_order == "BGR":
        mean, std = mean[::-1], std[::-1]
    return mean, std


PARAM_WIDTHS = {"crop_x": 1, "crop_y": 1, "mirror": 1, "shorter": 1, "roi_start": 2, "roi_end": 2, "mean": 3}


def batch_params(policy: Policy, seed: int, epoch: int, positions: np.ndarray, sizes: np.ndarray | None,
                 base_mean: np.ndarray, channel_order: str = "RGB") -> list[np.ndarray]:
    """The per-sample values of `policy.params()` for the samples at `positions` of `epoch`, packed
    as one float32 array (n, columns; PARAM_WIDTHS columns each, in the order of `params()`: one
    input for DALI to take in, where one per value costs its feeding thread about 0.5 µs per sample
    each), in a list: [] for a policy without per-sample values. `sizes` (n, 2): the records'
    (height, width), needed by "inception". With lighting, "mean" is the per-channel mean minus the
    sample's lighting offset: crop_mirror_normalize's (x - mean) / std is then (x + offset - mean) / std."""
    names = policy.params()
    if not names:
        return []
    values = {}
    if "mirror" in names:
        crop_x, crop_y, mirror = augmentation(seed, epoch, positions)
        values.update(crop_x=crop_x, crop_y=crop_y, mirror=mirror if policy.mirror else 0)
    if "shorter" in names:
        values["shorter"] = shorter_sides(seed, epoch, positions, *policy.scale)
    if "roi_start" in names:
        heights, widths = sizes[:, 0], sizes[:, 1]
        top, left, h, w = resized_crop_windows(seed, epoch, positions, heights, widths, policy.area, policy.ratio).T
        values["roi_start"] = np.stack([top / heights, left / widths], axis=1)
        values["roi_end"] = np.stack([(top + h) / heights, (left + w) / widths], axis=1)
    if "mean" in names:
        offset = lighting(seed, epoch, positions, policy.lighting)
        if channel_order == "BGR":
            offset = offset[:, ::-1]
        values["mean"] = base_mean[None, :] - offset
    packed = np.empty((len(positions), sum(PARAM_WIDTHS[name] for name in names)), np.float32)
    column = 0
    for name in names:  # rounded to float32 as they are stored
        width = PARAM_WIDTHS[name]
        packed[:, column:column + width] = np.reshape(values[name], (len(positions), -1) if width > 1 else (-1, 1))
        column += width
    return [packed]


def check_mean(mean_image, info, policy: Policy, gray: bool) -> None:
    """A .binaryproto mean fits the records and the policy (stored size: caffe/center/ten-crop only)."""
    c, h, w = mean_image.shape
    crop = policy.crop
    if c != (1 if gray else 3):
        raise ImgprepError(f"mean file has {c} channels; the database has {1 if gray else 3}")
    if (h, w) == (crop, crop):
        return
    if policy.name in ("resnet", "inception"):
        raise ImgprepError(f"mean file is {w}x{h}: the {policy.name!r} policy rescales each image, so only a "
                           f"{crop}x{crop} mean (compute-mean --crop {crop}) applies")
    if info.stored_size is None:
        raise ImgprepError(f"mean file is {w}x{h}: a stored-size mean (stock Caffe) needs records of one size, "
                           f"and {info.path}'s differ; use a {crop}x{crop} mean (compute-mean --crop {crop})")
    if (h, w) != info.stored_size:
        sh, sw = info.stored_size
        raise ImgprepError(f"mean file is {w}x{h} but the records are {sw}x{sh} and the crop is {crop}x{crop}; "
                           "Caffe needs the mean to match one of them")


@dataclass
class Normalisation:
    """How pixels are normalised (the loader's and the Dataset's `normalize=` argument, read by
    `parse`); `mean_image` (C, H, W) BGR float32 from a .binaryproto."""

    mean: tuple[float, ...] = IMAGENET_MEAN_RGB
    std: tuple[float, ...] = IMAGENET_STD_RGB
    mean_image: np.ndarray | None = None

    def at_source(self, crop: int) -> bool:
        """A stored-size mean (stock Caffe): subtracted at the source pixel, before crop and mirror,
        so the records are not resized; a crop-sized one (caffe-pro) at the output position."""
        return self.mean_image is not None and self.mean_image.shape[1:] != (crop, crop)

    @classmethod
    def parse(cls, normalize) -> "Normalisation":
        """'imagenet' (torchvision's mean/std), 'none', a .binaryproto path, or (mean, std) RGB 0..255."""
        if isinstance(normalize, Normalisation):
            return normalize
        if normalize in (None, "none"):
            return cls((0.0,), (1.0,))
        if normalize == "imagenet":
            return cls()
        if isinstance(normalize, (str, Path)):
            return cls((0.0,), (1.0,), load_mean(normalize))
        mean, std = normalize
        return cls(tuple(mean), tuple(std))

