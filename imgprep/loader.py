"""A DALI loader for imgprep databases with the ResNet recipe's policy.

Training: shorter side to 256, random 224x224 crop, random horizontal mirror. Evaluation:
shorter side to 256, center 224x224 crop. Then normalisation (per-channel mean/std, or a Caffe
`.binaryproto` mean image) and output as fp32/fp16, NCHW/NHWC, on the GPU ('mixed' JPEG
decoding) when there is one and in DALI's CPU mode when not.

One graph serves every source: LMDB records come from `fn.readers.caffe`; LevelDB (which DALI
cannot read) comes through `fn.external_source`, shaped exactly as the reader's output.
Raw records are reinterpreted: DALI hands their bytes back as if HWC, but Caffe stores planar
CHW BGR.

Epochs and shards: shard i of K holds the contiguous records [N*i//K, N*(i+1)//K) every epoch
(DALI's `stick_to_shard`), so across shards every record is seen exactly once per epoch. The
last batch of an epoch is partial (padding is trimmed) unless `drop_last`.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import ImgprepError
from .build import read_manifest, shard_range
from .codec import RecordError, decode_datum
from .mean import load_mean
from .storage import Reader, detect_backend

IMAGENET_MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
READER_NAME = "Reader"


@dataclass(frozen=True)
class DatabaseInfo:
    path: Path
    backend: str
    records: int
    encoded: bool
    channels: int
    stored_size: tuple[int, int] | None  # (H, W) when every record has that size (raw, squash)
    shorter_side: int | None  # when every record's shorter side is known to be this (imgprep builds)


def database_info(path) -> DatabaseInfo:
    path = Path(path)
    backend = detect_backend(path)
    with Reader(path, backend) as reader:
        records = len(reader)
        if records == 0:
            raise ImgprepError(f"{path} holds no records")
        key, value = next(reader.items())
    try:
        datum = decode_datum(value)
    except RecordError as e:
        raise ImgprepError(f"{path} does not hold Caffe Datum records (key {key[:40]!r}: {e})") from None
    manifest = read_manifest(path) or {}
    if manifest and manifest.get("state") != "complete":
        raise ImgprepError(f"{path} is an incomplete build (state {manifest.get('state')!r}); "
                           "finish it with build-lmdb --resume before training on it")
    identity = manifest.get("identity", {})
    resize = identity.get("resize", "")
    if manifest:
        uniform = resize.startswith("squash:") or bool(identity.get("check_size"))
    else:  # not built by imgprep: Caffe's raw databases are one size (convert_imageset --resize_*)
        uniform = not datum.encoded
    size = (datum.height, datum.width) if uniform and datum.height else None
    shorter = None
    if resize.startswith("shorter:"):
        shorter = int(resize.split(":")[1])
    elif size is not None:
        shorter = min(size)
    return DatabaseInfo(path, backend, records, datum.encoded, datum.channels or 3, size, shorter)


def shard_from_env(shard_id: int | None, num_shards: int | None) -> tuple[int, int]:
    """Explicit values, else torchrun's RANK / WORLD_SIZE, else a single shard."""
    if shard_id is None and num_shards is None:
        shard_id = int(os.environ.get("RANK", 0))
        num_shards = int(os.environ.get("WORLD_SIZE", 1))
    shard_id, num_shards = shard_id or 0, num_shards or 1
    if not 0 <= shard_id < num_shards:
        raise ImgprepError(f"shard_id {shard_id} is not in 0..{num_shards - 1}")
    return shard_id, num_shards


class RecordSource:
    """external_source callable: batches of (record data, label) for the records at positions
    [begin, end) of a database, shaped as `readers.caffe` shapes them, reshuffled every epoch when
    `shuffle`, and padded with the last record at the end of each epoch. Serves LevelDB (which DALI
    cannot read) and the sub-ranges of a split (`cpu_share`) loader."""

    def __init__(self, path, backend, batch_size, begin, end, shuffle, seed):
        self.reader = Reader(path, backend)
        self.keys = list(itertools.islice(self.reader.keys(), begin, end))
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self.order = self._order()

    def close(self) -> None:
        self.reader.close()

    def _order(self):
        if self.shuffle:
            return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.keys))
        return np.arange(len(self.keys))

    def _sample(self, key):
        datum = decode_datum(self.reader.get(key))
        data = np.frombuffer(datum.data, np.uint8)
        if not datum.encoded:  # as readers.caffe does: the bytes, labelled (H, W, C)
            data = data.reshape(datum.height, datum.width, datum.channels)
        return data, np.array([datum.label], np.int32)

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.position = 0
        self.order = self._order()

    def __call__(self):
        if self.position == len(self.keys):  # the last epoch ended on a batch boundary
            self._next_epoch()
        samples = []
        while len(samples) < self.batch_size:
            if self.position == len(self.keys):  # pad to the batch end; the next batch starts an epoch
                samples += [samples[-1]] * (self.batch_size - len(samples))
                self._next_epoch()
                break
            samples.append(self._sample(self.keys[self.order[self.position]]))
            self.position += 1
        return [s[0] for s in samples], [s[1] for s in samples]


@dataclass
class Normalisation:
    """How pixels are normalised; `mean_image` (C, H, W) BGR float32 from a .binaryproto."""

    mean: tuple[float, ...] = IMAGENET_MEAN_RGB
    std: tuple[float, ...] = IMAGENET_STD_RGB
    mean_image: np.ndarray | None = None

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


def _graph(info: DatabaseInfo, train, crop, resize_shorter, norm: Normalisation, dtype, layout, gpu,
           reader_shard, source, shuffle_buffer, decode_on_cpu=False):
    """The policy graph. Records come from `readers.caffe` over `reader_shard` (shard_id, num_shards),
    or from `source` (a RecordSource). With `decode_on_cpu` a GPU graph decodes on CPU threads and
    crops and normalises on the GPU."""
    from nvidia.dali import fn, types

    if source is None:
        shard_id, num_shards = reader_shard
        value, label = fn.readers.caffe(
            path=str(info.path), shard_id=shard_id, num_shards=num_shards, random_shuffle=train,
            initial_fill=shuffle_buffer, stick_to_shard=True, pad_last_batch=True, name=READER_NAME)
    else:
        value, label = fn.external_source(source=source, num_outputs=2, batch=True,
                                          dtype=[types.UINT8, types.INT32])
    gray = info.channels == 1
    mean_image = norm.mean_image
    subtract_at_source = mean_image is not None and mean_image.shape[1:] != (crop, crop)
    if mean_image is not None:
        _check_mean(mean_image, info, crop, gray)
    needs_resize = info.shorter_side != resize_shorter and not subtract_at_source
    if train:
        crop_x, crop_y = fn.random.uniform(range=(0.0, 1.0)), fn.random.uniform(range=(0.0, 1.0))
        mirror = fn.random.coin_flip(probability=0.5)
    else:
        crop_x = crop_y = 0.5
        mirror = 0
    window = dict(crop=(crop, crop), crop_pos_x=crop_x, crop_pos_y=crop_y)
    # On CPU, decoding only the crop window (libjpeg-turbo skips the rest) is measurably faster when no
    # resize comes between decode and crop; on the GPU it is slower (SPEC §7), so the GPU decodes whole.
    cpu_decoder = not gpu or decode_on_cpu
    decode_window = info.encoded and cpu_decoder and not needs_resize and not subtract_at_source
    output_type = types.GRAY if gray else types.RGB
    if decode_window:
        images = fn.decoders.image_crop(value, device="cpu", output_type=output_type, **window)
        window = {}
    elif info.encoded:
        images = fn.decoders.image(value, device="cpu" if cpu_decoder else "mixed", output_type=output_type)
    else:
        if gpu:
            value = value.gpu()
        images = fn.transpose(fn.reshape(value, src_dims=[2, 0, 1], layout="CHW"), perm=[1, 2, 0],
                              output_layout="HWC")
        if not gray:
            images = fn.color_space_conversion(images, image_type=types.BGR, output_type=types.RGB)
    if gpu and info.encoded and cpu_decoder:
        images = images.gpu()

    def constant(array):  # on the images' device: a CPU constant would be copied over every batch
        return types.Constant(np.asarray(array, np.float32), device="gpu" if gpu else "cpu")

    if subtract_at_source:  # stock Caffe: mean of the stored size, before crop and mirror
        images = fn.cast(images, dtype=types.FLOAT) - constant(_hwc_rgb(mean_image))
    elif needs_resize:  # records already at the policy's size skip a no-op resample
        images = fn.resize(images, resize_shorter=resize_shorter, antialias=True)
    channels = 1 if gray else 3
    mean = norm.mean * channels if len(norm.mean) == 1 else norm.mean
    std = norm.std * channels if len(norm.std) == 1 else norm.std
    out_dtype = types.FLOAT16 if dtype == "float16" else types.FLOAT
    chw = layout == "NCHW"
    if mean_image is not None and not subtract_at_source:
        # caffe-pro: a crop-sized mean, subtracted at the output position (after crop and mirror)
        images = fn.crop_mirror_normalize(images, mirror=mirror, dtype=types.FLOAT,
                                          output_layout="CHW" if chw else "HWC", **window)
        target = mean_image[::-1].copy() if chw else _hwc_rgb(mean_image)
        images = (images - constant(target)) / constant(np.reshape(std, (-1, 1, 1) if chw else (1, 1, -1)))
        images = fn.cast(images, dtype=out_dtype)
    else:
        images = fn.crop_mirror_normalize(images, mirror=mirror, dtype=out_dtype,
                                          mean=list(mean) if not subtract_at_source else [0.0] * channels,
                                          std=list(std), output_layout="CHW" if chw else "HWC", **window)
    if gpu:
        label = label.gpu()
    return images, label


def _hwc_rgb(mean_chw_bgr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(mean_chw_bgr[::-1].transpose(1, 2, 0), dtype=np.float32)


def _check_mean(mean_image, info: DatabaseInfo, crop, gray):
    c, h, w = mean_image.shape
    if c != (1 if gray else 3):
        raise ImgprepError(f"mean file has {c} channels; the database has {1 if gray else 3}")
    if (h, w) == (crop, crop):
        return
    if info.stored_size is None:
        raise ImgprepError(f"mean file is {w}x{h}: a stored-size mean (stock Caffe) needs records of one size, "
                           f"and {info.path}'s differ; use a {crop}x{crop} mean (compute-mean --crop {crop})")
    if (h, w) != info.stored_size:
        sh, sw = info.stored_size
        raise ImgprepError(f"mean file is {w}x{h} but the records are {sw}x{sh} and the crop is {crop}x{crop}; "
                           "Caffe needs the mean to match one of them")


@dataclass
class _Stream:
    """One pipeline over `size` consecutive records of this shard."""

    pipeline: object
    size: int
    source: RecordSource | None = None


class Loader:
    """Batches of (images, labels) from an imgprep database through DALI.

    `for images, labels in Loader(db, batch_size=256): ...` yields numpy arrays; use
    `output="torch"` for PyTorch tensors or `output="jax"` for JAX arrays on the pipeline's device.
    `len(loader)` is the number of batches in one epoch of this shard; `loader.epoch_size` the
    number of records.

    `cpu_share` (GPU only; 0 by default) gives that fraction of the shard's records to a second
    pipeline that decodes JPEGs on `cpu_threads` CPU threads and crops/normalises on the GPU,
    beside the GPU-decoding one: the CPU cores that sit idle while the GPU decodes add throughput.
    Batches of the two alternate so both end each epoch together.
    """

    def __init__(self, db, batch_size: int = 256, train: bool = True, crop: int = 224,
                 resize_shorter: int = 256, normalize="imagenet", dtype: str = "float32",
                 layout: str = "NCHW", device: str = "auto", device_id: int | None = None,
                 seed: int = 0, shard_id: int | None = None, num_shards: int | None = None,
                 num_threads: int | None = None, drop_last: bool = False, output: str = "numpy",
                 shuffle_buffer: int = 1024, prefetch: int = 2, cpu_share: float = 0.0,
                 cpu_threads: int | None = None):
        from .env import gpu_count

        if dtype not in ("float32", "float16") or layout not in ("NCHW", "NHWC"):
            raise ImgprepError("dtype must be float32 or float16, layout NCHW or NHWC")
        if output not in ("numpy", "torch", "jax"):
            raise ImgprepError("output must be 'numpy', 'torch' or 'jax'")
        if not 0.0 <= cpu_share < 1.0:
            raise ImgprepError("cpu_share must be in [0, 1)")
        self.info = database_info(db)
        if device == "auto":
            device = "gpu" if gpu_count() > 0 else "cpu"
        if device == "gpu" and gpu_count() == 0:
            raise ImgprepError("device='gpu' but DALI sees no CUDA GPU; use device='cpu' or 'auto'")
        self.device = device
        self.shard_id, self.num_shards = shard_from_env(shard_id, num_shards)
        shard = shard_range(self.info.records, self.num_shards, self.shard_id)
        start, stop = shard.start, shard.stop
        self.epoch_size = stop - start
        if self.epoch_size == 0:
            raise ImgprepError(f"shard {self.shard_id} of {self.num_shards} is empty ({self.info.records} records)")
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.output = output
        gpu = device == "gpu"
        if device_id is None and gpu:
            device_id = int(os.environ.get("LOCAL_RANK", 0))
        threads = num_threads or max(1, min(8, len(os.sched_getaffinity(0))))
        graph = dict(info=self.info, train=train, crop=crop, resize_shorter=resize_shorter,
                     norm=Normalisation.parse(normalize), dtype=dtype, layout=layout, gpu=gpu,
                     shuffle_buffer=shuffle_buffer)
        pipeline_args = dict(batch_size=batch_size, device_id=device_id if gpu else None, seed=seed,
                             prefetch_queue_depth=prefetch)
        split = start + round(self.epoch_size * (1.0 - cpu_share))
        if cpu_share and not self.info.encoded:
            raise ImgprepError("cpu_share splits JPEG decoding; the database holds raw records")
        self._streams: list[_Stream] = []
        try:
            for begin, end, decode_on_cpu, n_threads in ((start, split, False, threads),
                                                          (split, stop, True, cpu_threads or threads)):
                if end == begin:
                    continue
                source = None
                if self.info.backend != "lmdb" or cpu_share:  # readers.caffe only splits evenly
                    source = RecordSource(self.info.path, self.info.backend, batch_size, begin, end, train, seed)
                self._streams.append(_Stream(_build_pipeline(graph, pipeline_args, n_threads, source,
                                                             (self.shard_id, self.num_shards), decode_on_cpu),
                                             end - begin, source))
        except Exception:
            self.close()
            raise

    @property
    def pipeline(self):
        """The (first) DALI pipeline, for callers that drive it directly."""
        return self._streams[0].pipeline

    def close(self) -> None:
        """Releases the pipelines and any database handle (LevelDB allows one per process)."""
        for stream in self._streams:
            if stream.source is not None:
                stream.source.close()
        self._streams = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _batches(self, stream: _Stream) -> int:
        if self.drop_last:
            return stream.size // self.batch_size
        return math.ceil(stream.size / self.batch_size)

    def __len__(self) -> int:
        return sum(self._batches(stream) for stream in self._streams)

    def __iter__(self):
        taken = [0] * len(self._streams)
        totals = [self._batches(stream) for stream in self._streams]
        for _ in range(sum(totals)):
            # the stream furthest behind in its share of the epoch goes next
            i = min((k for k in range(len(totals)) if taken[k] < totals[k]), key=lambda k: taken[k] / totals[k])
            stream = self._streams[i]
            images, labels = stream.pipeline.run()
            keep = min(self.batch_size, stream.size - taken[i] * self.batch_size)
            taken[i] += 1
            labels = self._convert(labels, keep).reshape(-1)
            yield self._convert(images, keep), labels.long() if self.output == "torch" else labels
        for stream in self._streams:
            if self.drop_last and stream.size % self.batch_size:
                stream.pipeline.run()  # the epoch's partial batch, dropped, so the next epoch starts aligned

    def _convert(self, tensor_list, keep: int):
        if self.output == "torch":
            return _to_torch(tensor_list, keep)
        if self.output == "jax":
            return _to_jax(tensor_list, keep)
        return _to_numpy(tensor_list)[:keep]


def _build_pipeline(graph: dict, pipeline_args: dict, threads: int, source, reader_shard, decode_on_cpu):
    from nvidia.dali import pipeline_def

    @pipeline_def(num_threads=threads, **pipeline_args)
    def pipeline():
        return _graph(**graph, reader_shard=reader_shard, source=source, decode_on_cpu=decode_on_cpu)

    built = pipeline()
    built.build()
    return built


def _on_gpu(tensor_list) -> bool:
    from nvidia.dali.backend import TensorListGPU

    return isinstance(tensor_list, TensorListGPU)


def _to_numpy(tensor_list) -> np.ndarray:
    if _on_gpu(tensor_list):
        tensor_list = tensor_list.as_cpu()
    return np.asarray(tensor_list.as_tensor())


def _to_torch(tensor_list, keep: int):
    import torch

    if not _on_gpu(tensor_list):
        return torch.from_numpy(_to_numpy(tensor_list))[:keep]
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    tensor = tensor_list.as_tensor()
    device = torch.device("cuda", tensor_list.device_id())  # the pipeline's GPU, whatever torch's current one is
    out = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device=device)
    feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(device))
    return out[:keep]


def _to_jax(tensor_list, keep: int):
    """A JAX array on the pipeline's device; copied, because DALI reuses its output buffers."""
    import jax
    import jax.numpy as jnp

    if not _on_gpu(tensor_list):
        return jnp.asarray(_to_numpy(tensor_list)[:keep])
    return jax.dlpack.from_dlpack(tensor_list.as_tensor()).copy()[:keep]
