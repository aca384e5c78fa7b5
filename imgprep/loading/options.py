"""The arguments `Loader` and `CaffeDataset` take, checked in one place: a bad value is an
`OptionError` whose message names the argument (or the environment variable) it came from.
"""

from __future__ import annotations

import os

import numpy as np

from imgprep import ImgprepError


class OptionError(ImgprepError, ValueError):
    """A bad argument to the loader or the Dataset; the message names it. A ValueError to Python
    code, and an ImgprepError the commands print without a traceback."""


def whole(name: str, value, least: int = 1) -> int:
    """`value` as an int of at least `least` (a bool or float is refused), else an OptionError naming `name`."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < least:
        raise OptionError(f"{name} must be a whole number >= {least}, not {value!r}")
    return int(value)


def _environment_whole(name: str, default: int, least: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < least:
        raise OptionError(f"{name}={text!r} in the environment is not a whole number >= {least} (torchrun sets "
                          f"RANK and WORLD_SIZE); fix or unset it, or pass shard_id and num_shards")
    return value


def shards(shard_id, num_shards) -> tuple[int, int]:
    """(shard_id, num_shards): both given, or neither, when torchrun's RANK and WORLD_SIZE are read
    (unset: one shard)."""
    if shard_id is None and num_shards is None:
        shard_id, num_shards = _environment_whole("RANK", 0, 0), _environment_whole("WORLD_SIZE", 1, 1)
        if shard_id >= num_shards:
            raise OptionError(f"RANK={shard_id} in the environment is not below WORLD_SIZE={num_shards}")
        return shard_id, num_shards
    if shard_id is None or num_shards is None:
        raise OptionError("pass shard_id and num_shards together (or neither, to take torchrun's RANK and "
                          "WORLD_SIZE)")
    num_shards, shard_id = whole("num_shards", num_shards), whole("shard_id", shard_id, 0)
    if shard_id >= num_shards:
        raise OptionError(f"shard_id {shard_id} is not in 0..{num_shards - 1} (num_shards {num_shards})")
    return shard_id, num_shards


def check_pixels(info, policy, norm) -> None:
    """`policy` (a policies.Policy) and the normalisation `norm` (a policies.Normalisation) fit
    the database `info` (loader.DatabaseInfo): crop and resize_shorter are whole numbers, the crop
    fits in the image it is taken from, and the means and standard deviations match the records'
    channels (a .binaryproto mean: `policies.check_mean`)."""
    from imgprep.loading.policies import check_mean

    crop, shorter = whole("crop", policy.crop), whole("resize_shorter", policy.resize_shorter)
    channels = info.channels
    if norm.mean_image is not None:
        check_mean(norm.mean_image, info, policy, channels == 1)
    elif {len(norm.mean), len(norm.std)} - {1, channels}:
        hint = (" (the records are grayscale: pass one mean and one standard deviation, "
                "normalize=((mean,), (std,)), or normalize='none')") if channels == 1 else ""
        raise OptionError(f"normalize gives {len(norm.mean)} means and {len(norm.std)} standard deviations "
                          f"for {channels}-channel records{hint}")
    if policy.name == "inception" or policy.scale:  # resized to the crop; "resnet": crop <= its scale's low end
        return
    if norm.at_source(crop):  # a stored-size mean: the records are cropped as stored (check_mean: they have one size)
        height, width = info.stored_size
        if crop > min(height, width):
            raise OptionError(f"crop {crop} is larger than the records ({width}x{height}), which a stored-size "
                              f"mean crops as they are stored")
    elif crop > shorter:
        raise OptionError(f"crop {crop} is larger than resize_shorter {shorter}: the {policy.name!r} policy crops "
                          f"the image resized to shorter side {shorter}")
