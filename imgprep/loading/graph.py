"""The DALI graph of a policy: the records the loader's feed hands over, to normalised batches."""

from __future__ import annotations

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


def graph(info, policy: Policy, norm, dtype, layout, gpu, feed, decode_on_cpu=False, channel_order="RGB"):
    """The DALI graph of `policy` over the records `feed` hands over (data, label, then the values of
    `policy.params()` per sample, packed by `batch_params`). With `decode_on_cpu` a GPU graph decodes
    on CPU threads and does the rest on the GPU."""
    from nvidia.dali import fn, types

    names = policy.params()
    outputs = fn.external_source(source=feed, num_outputs=2 + bool(names), batch=True, no_copy=True,
                                 dtype=[types.UINT8, types.INT32] + [types.FLOAT] * bool(names))
    value, label = outputs[0], outputs[1]
    drawn = _unpack(outputs[2], names) if names else {}
    gray, bgr, crop = info.channels == 1, channel_order == "BGR", policy.crop
    if gray and policy.lighting:
        raise ImgprepError("PCA lighting needs RGB records; the database is grayscale")
    mean_image = norm.mean_image
    if mean_image is not None:
        check_mean(mean_image, info, policy, gray)
    subtract_at_source = norm.at_source(crop)
    fixed_resize = policy.name in ("caffe", "center", "ten-crop") and not policy.scale
    needs_resize = fixed_resize and info.shorter_side != policy.resize_shorter and not subtract_at_source
    # DALI places the window at round(crop_pos * (size - crop)), halves up; Caffe's TEST phase floors
    # the center offset.
    if "crop_x" in drawn:
        window = dict(crop=(crop, crop), crop_pos_x=drawn["crop_x"], crop_pos_y=drawn["crop_y"])
    else:
        window = dict(crop=(crop, crop), crop_pos_x=0.5, crop_pos_y=0.5)
    # On CPU, decoding only the crop window (libjpeg-turbo skips the rest) is measurably faster when no
    # resize comes between decode and crop; on the GPU decoding the window is slower than decoding whole
    # images (measured on an H100 with DALI 2.4), so the GPU decodes whole.
    cpu_decoder = not gpu or decode_on_cpu
    decode_window = (info.encoded and cpu_decoder and fixed_resize and policy.name != "ten-crop"
                     and not needs_resize and not subtract_at_source)
    output_type = types.GRAY if gray else types.RGB
    if decode_window:
        images = fn.decoders.image_crop(value, device="cpu", output_type=output_type, **window)
        window = {}
    elif info.encoded:
        # nvJPEG upsamples chroma as libjpeg-turbo (DALI's CPU decoder) does only when asked to
        gpu_decoder = {} if cpu_decoder else {"jpeg_fancy_upsampling": True}
        images = fn.decoders.image(value, device="cpu" if cpu_decoder else "mixed", output_type=output_type,
                                   **gpu_decoder)
    else:
        if gpu:
            value = value.gpu()
        images = fn.transpose(fn.reshape(value, src_dims=[2, 0, 1], layout="CHW"), perm=[1, 2, 0],
                              output_layout="HWC")
        if not gray and not bgr:  # raw records are BGR
            images = fn.color_space_conversion(images, image_type=types.BGR, output_type=types.RGB)
    if gpu and info.encoded and cpu_decoder:
        images = images.gpu()
    if info.encoded and bgr and not gray:
        images = fn.color_space_conversion(images, image_type=types.RGB, output_type=types.BGR)

    def constant(array):  # on the images' device: a CPU constant would be copied over every batch
        return types.Constant(np.asarray(array, np.float32), device="gpu" if gpu else "cpu")

    channels = 1 if gray else 3
    mean_chw = None if mean_image is None else (mean_image if bgr or gray else mean_image[::-1])  # output order
    if subtract_at_source:  # stock Caffe: mean of the stored size, before crop and mirror
        images = fn.cast(images, dtype=types.FLOAT) - constant(mean_chw.transpose(1, 2, 0))
    elif policy.name == "resnet" and policy.scale:
        images = fn.resize(images, resize_shorter=drawn["shorter"], antialias=True)
    elif policy.name == "inception":
        images = fn.resize(images, size=(crop, crop), roi_start=drawn["roi_start"], roi_end=drawn["roi_end"],
                           roi_relative=True, antialias=True)
        window = {}
    elif needs_resize or (policy.name == "resnet" and info.shorter_side != policy.resize_shorter):
        images = fn.resize(images, resize_shorter=policy.resize_shorter, antialias=True)
    base_mean, std = output_mean_std(norm, channels, channel_order)
    mean = drawn["mean"] if "mean" in drawn else [float(m) for m in base_mean]
    out_dtype = types.FLOAT16 if dtype == "float16" else types.FLOAT
    chw = layout == "NCHW"

    def normalise(mirror, where):
        if mean_image is not None and not subtract_at_source:
            # caffe-pro: a crop-sized mean, subtracted at the output position (after crop and mirror)
            out = fn.crop_mirror_normalize(images, mirror=mirror, dtype=types.FLOAT, mean=mean, std=[1.0] * channels,
                                           output_layout="CHW" if chw else "HWC", **where)
            target = mean_chw if chw else mean_chw.transpose(1, 2, 0)
            out = (out - constant(target)) / constant(np.reshape(std, (-1, 1, 1) if chw else (1, 1, -1)))
            return fn.cast(out, dtype=out_dtype)
        return fn.crop_mirror_normalize(images, mirror=mirror, dtype=out_dtype, mean=mean,
                                        std=[float(s) for s in std], output_layout="CHW" if chw else "HWC", **where)

    if policy.name == "ten-crop":
        views = [normalise(mirror, dict(crop=(crop, crop), crop_pos_x=x, crop_pos_y=y))
                 for mirror in (0, 1) for x, y in TEN_CROP_POSITIONS]
        images = fn.stack(*views, axis=0)
    else:
        images = normalise(drawn.get("mirror", 0), window)
    if gpu:
        label = label.gpu()
    return images, label
