"""The DALI graph of a policy: the records the loader's feed hands over, to normalised batches.

`graph` composes the stages, each a small function of a `GraphSpec` (what they decide from):

    read (the feed's records, labels and draws) -> decode (JPEG or raw, to HWC in the output's
    channel order, on the device the rest runs on) -> source mean (stock Caffe's stored-size mean)
    -> resize (the policy's shorter side, scale augmentation or RandomResizedCrop) -> crop, mirror,
    normalise and layout (one `crop_mirror_normalize`, or ten of them for "ten-crop")
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from imgprep import ImgprepError
from imgprep.loading.policies import PARAM_WIDTHS, TEN_CROP_POSITIONS, Policy, check_mean, output_mean_std


def _unpack(packed, names) -> dict:
    """The graph's per-sample values out of batch_params' packed array (the mirror flag as int32)."""
    from nvidia.dali import fn, types

    drawn, column = {}, 0
    for name in names:
        width = PARAM_WIDTHS[name]
        node = packed[column] if width == 1 else packed[column:column + width]
        drawn[name] = fn.cast(node, dtype=types.INT32) if name == "mirror" else node
        column += width
    return drawn


@dataclass(frozen=True)
class GraphSpec:
    """What the stages decide from: the records (`info`, a DatabaseInfo), the policy, the
    normalisation, the output's dtype, layout and channel order, and where each part runs (`gpu`:
    a GPU graph; `cpu_decoder`: JPEGs are decoded on CPU threads)."""

    info: object
    policy: Policy
    norm: object
    dtype: str
    layout: str
    gpu: bool
    cpu_decoder: bool
    channel_order: str = "RGB"

    @property
    def gray(self) -> bool:
        """One channel."""
        return self.info.channels == 1

    @property
    def bgr(self) -> bool:
        """Caffe's channel order out."""
        return self.channel_order == "BGR"

    @property
    def at_source(self) -> bool:
        """A stored-size mean, subtracted before the crop (the records are then not resized)."""
        return self.norm.at_source(self.policy.crop)

    @property
    def fixed_resize(self) -> bool:
        """The policy resizes to one shorter side ("caffe", "center", "ten-crop")."""
        return self.policy.name in ("caffe", "center", "ten-crop") and not self.policy.scale

    @property
    def needs_resize(self) -> bool:
        """The fixed shorter side differs from the records'."""
        return self.fixed_resize and self.info.shorter_side != self.policy.resize_shorter and not self.at_source

    @property
    def decode_window(self) -> bool:
        """JPEGs are decoded only within the crop window: on CPU, where libjpeg-turbo skips the rest
        (measurably faster) and no resize comes between decode and crop; on the GPU decoding the
        window is slower than decoding whole images (measured on an H100 with DALI 2.4)."""
        return (self.info.encoded and self.cpu_decoder and self.fixed_resize and self.policy.name != "ten-crop"
                and not self.needs_resize and not self.at_source)

    @cached_property
    def mean_chw(self) -> np.ndarray | None:
        """The .binaryproto mean image (C, H, W) in the output's channel order (None: none)."""
        mean = self.norm.mean_image
        return None if mean is None else (mean if self.bgr or self.gray else mean[::-1])

    def check(self) -> None:
        """The policy and the normalisation fit the records (an ImgprepError where not)."""
        if self.gray and self.policy.lighting:
            raise ImgprepError("PCA lighting needs RGB records; the database is grayscale")
        if self.norm.mean_image is not None:
            check_mean(self.norm.mean_image, self.info, self.policy, self.gray)

    def constant(self, array):
        """A float32 constant on the images' device (a CPU constant would be copied over every batch)."""
        from nvidia.dali import types

        return types.Constant(np.asarray(array, np.float32), device="gpu" if self.gpu else "cpu")


def read(spec: GraphSpec, feed):
    """The feed's batch: (records, labels, the drawn values by name: `policy.params()` unpacked)."""
    from nvidia.dali import fn, types

    names = spec.policy.params()
    outputs = fn.external_source(source=feed, num_outputs=2 + bool(names), batch=True, no_copy=True,
                                 dtype=[types.UINT8, types.INT32] + [types.FLOAT] * bool(names))
    return outputs[0], outputs[1], _unpack(outputs[2], names) if names else {}


def crop_window(spec: GraphSpec, drawn: dict) -> dict:
    """The crop's size and position as DALI's crop arguments: the drawn position for training, the
    center for evaluation. DALI places the window at round(crop_pos * (size - crop)), halves up;
    Caffe's TEST phase floors the center offset."""
    crop = spec.policy.crop
    if "crop_x" in drawn:
        return dict(crop=(crop, crop), crop_pos_x=drawn["crop_x"], crop_pos_y=drawn["crop_y"])
    return dict(crop=(crop, crop), crop_pos_x=0.5, crop_pos_y=0.5)


def decode(spec: GraphSpec, value, drawn: dict):
    """Records to HWC uint8 images in the output's channel order, on the device the rest runs on:
    JPEGs decoded (within the crop window where `spec.decode_window`), raw records (Caffe's planar
    BGR) transposed."""
    from nvidia.dali import fn, types

    output_type = types.GRAY if spec.gray else types.RGB
    if spec.decode_window:
        images = fn.decoders.image_crop(value, device="cpu", output_type=output_type, **crop_window(spec, drawn))
    elif spec.info.encoded:
        # nvJPEG upsamples chroma as libjpeg-turbo (DALI's CPU decoder) does only when asked to
        gpu_decoder = {} if spec.cpu_decoder else {"jpeg_fancy_upsampling": True}
        images = fn.decoders.image(value, device="cpu" if spec.cpu_decoder else "mixed", output_type=output_type,
                                   **gpu_decoder)
    else:
        if spec.gpu:
            value = value.gpu()
        images = fn.transpose(fn.reshape(value, src_dims=[2, 0, 1], layout="CHW"), perm=[1, 2, 0],
                              output_layout="HWC")
        if not spec.gray and not spec.bgr:  # raw records are BGR
            images = fn.color_space_conversion(images, image_type=types.BGR, output_type=types.RGB)
    if spec.gpu and spec.info.encoded and spec.cpu_decoder:
        images = images.gpu()
    if spec.info.encoded and spec.bgr and not spec.gray:
        images = fn.color_space_conversion(images, image_type=types.RGB, output_type=types.BGR)
    return images


def subtract_source_mean(spec: GraphSpec, images):
    """Stock Caffe: a mean of the stored size subtracted at the source pixel, before crop and mirror
    (float images); the images unchanged without one."""
    from nvidia.dali import fn, types

    if not spec.at_source:
        return images
    return fn.cast(images, dtype=types.FLOAT) - spec.constant(spec.mean_chw.transpose(1, 2, 0))


def resize(spec: GraphSpec, images, drawn: dict):
    """The policy's resize: the drawn shorter side ("resnet"), the drawn RandomResizedCrop window
    resized to the crop ("inception"), or the fixed shorter side where the records differ from it."""
    from nvidia.dali import fn

    policy, crop = spec.policy, spec.policy.crop
    if policy.name == "resnet" and policy.scale:
        return fn.resize(images, resize_shorter=drawn["shorter"], antialias=True)
    if policy.name == "inception":
        return fn.resize(images, size=(crop, crop), roi_start=drawn["roi_start"], roi_end=drawn["roi_end"],
                         roi_relative=True, antialias=True)
    if spec.needs_resize or (policy.name == "resnet" and spec.info.shorter_side != policy.resize_shorter):
        return fn.resize(images, resize_shorter=policy.resize_shorter, antialias=True)
    return images


def normalise(spec: GraphSpec, images, drawn: dict, mirror, window: dict):
    """One view: cropped to `window` (DALI's crop arguments; {}: cropped already), mirrored where
    `mirror`, normalised ((x - mean) / std; the lighting shifts each sample's mean; a crop-sized mean
    image is subtracted at the output position, as caffe-pro does) and laid out as `spec.layout`."""
    from nvidia.dali import fn, types

    channels = 1 if spec.gray else 3
    base_mean, std = output_mean_std(spec.norm, channels, spec.channel_order)
    mean = drawn["mean"] if "mean" in drawn else [float(m) for m in base_mean]
    out_dtype = types.FLOAT16 if spec.dtype == "float16" else types.FLOAT
    chw = spec.layout == "NCHW"
    output_layout = "CHW" if chw else "HWC"
    if spec.norm.mean_image is not None and not spec.at_source:
        out = fn.crop_mirror_normalize(images, mirror=mirror, dtype=types.FLOAT, mean=mean, std=[1.0] * channels,
                                       output_layout=output_layout, **window)
        target = spec.mean_chw if chw else spec.mean_chw.transpose(1, 2, 0)
        out = (out - spec.constant(target)) / spec.constant(np.reshape(std, (-1, 1, 1) if chw else (1, 1, -1)))
        return fn.cast(out, dtype=out_dtype)
    return fn.crop_mirror_normalize(images, mirror=mirror, dtype=out_dtype, mean=mean,
                                    std=[float(s) for s in std], output_layout=output_layout, **window)


def views(spec: GraphSpec, images, drawn: dict):
    """The policy's output views: "ten-crop"'s ten (the corners and the center, then mirrored,
    stacked on a new axis 0), else one, at the crop window (none where decode or resize cropped)."""
    from nvidia.dali import fn

    if spec.policy.name == "ten-crop":
        crop = spec.policy.crop
        return fn.stack(*[normalise(spec, images, drawn, mirror, dict(crop=(crop, crop), crop_pos_x=x, crop_pos_y=y))
                          for mirror in (0, 1) for x, y in TEN_CROP_POSITIONS], axis=0)
    cropped = spec.decode_window or spec.policy.name == "inception"
    return normalise(spec, images, drawn, drawn.get("mirror", 0), {} if cropped else crop_window(spec, drawn))


def graph(info, policy: Policy, norm, dtype, layout, gpu, feed, decode_on_cpu=False, channel_order="RGB"):
    """The DALI graph of `policy` over the records `feed` hands over (data, label, then the values of
    `policy.params()` per sample, packed by `batch_params`): (images, labels). With `decode_on_cpu` a
    GPU graph decodes on CPU threads and does the rest on the GPU."""
    spec = GraphSpec(info, policy, norm, dtype, layout, gpu, not gpu or decode_on_cpu, channel_order)
    value, label, drawn = read(spec, feed)
    spec.check()
    images = resize(spec, subtract_source_mean(spec, decode(spec, value, drawn)), drawn)
    return views(spec, images, drawn), label.gpu() if gpu else label
