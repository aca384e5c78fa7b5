"""A DALI loader for imgprep databases, owning the sample order, with the policies of `policies`.

Policies (`policies.py`): training "caffe" (shorter side 256, random 224x224 crop, random mirror; the
default), "resnet" (scale augmentation [256, 480] + crop + mirror + PCA lighting), "inception"
(RandomResizedCrop + mirror); evaluation "center" (shorter side 256, the center 224x224 crop, placed
as DALI places it: offset (W-224)/2 with a half pixel rounded up, where Caffe's TEST phase rounds it
down) and "ten-crop". Then normalisation (per-channel mean/std, or a Caffe `.binaryproto` mean image),
RGB or Caffe's BGR channel order, and output as fp32/fp16, NCHW/NHWC, on the GPU ('mixed' JPEG
decoding) when there is one and in DALI's CPU mode when not.

The loader decides which records each batch holds (`plan.EpochPlan`: epoch e visits
`order.permutation(N, seed, e)`, rank i of K takes every K-th sample of it, as PyTorch's
DistributedSampler does; where it is, `plan.Position`) and feeds them to DALI through
`fn.external_source`, reading each record by key (`records.RecordSource`), from LMDB and LevelDB
alike, with each sample's random draws (`policies.batch_params`, from `draws`), into the policy's
graph (`graph.graph`). Raw records are reinterpreted: they are handed over labelled HWC,
as DALI's `readers.caffe` does, and turned back from Caffe's planar CHW BGR in the graph.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections import deque
from pathlib import Path

import numpy as np

from imgprep import ImgprepError
from imgprep.loading.options import OptionError, check_pixels, shards, whole
from imgprep.loading.plan import EmptyShard, EpochPlan, Position, split_steps
from imgprep.loading.graph import graph
from imgprep.loading.policies import (CHANNEL_ORDERS, Normalisation, Policy, batch_params, output_mean_std,
                                     parse_policy)
from imgprep.loading.records import RecordSource
from imgprep.formats.database import complete_manifest, database_info
from imgprep.formats.storage import detect_backend


class UpscaleWarning(UserWarning):
    """A policy resizes records to a larger shorter side than they were built with."""


class _Feed:
    """The `fn.external_source` callable of pipeline `index`: the plan's batches assigned to it,
    one per call, from a position on. DALI calls it when it schedules a batch, so `scheduled` lists
    the (epoch, step) of every batch DALI runs ahead of what the loader handed out, in order.
    `params(epoch, positions, records, data)` gives the policy's per-sample values of a batch."""

    def __init__(self, plan: EpochPlan, source: RecordSource, params, index: int, pipeline_of, keep: int = 4):
        self.plan, self.source, self.params, self.index, self.pipeline_of = plan, source, params, index, pipeline_of
        self.scheduled: deque[tuple[int, int]] = deque()
        self.cursor = self._ours(0, 0)
        # DALI reads the arrays in place (no_copy) until the batch is done: hold the last few batches
        self._alive: deque = deque(maxlen=keep)

    def _ours(self, epoch: int, step: int) -> tuple[int, int]:
        """The first batch at or after (epoch, step) that this pipeline runs."""
        while self.pipeline_of(step) != self.index:
            epoch, step = self.plan.after(epoch, step)
        return epoch, step

    def upcoming(self, epoch: int, step: int, count: int) -> list[tuple[int, int]]:
        """This pipeline's next `count` batches from (epoch, step) on."""
        out = []
        while len(out) < count:
            epoch, step = self._ours(epoch, step)
            out.append((epoch, step))
            epoch, step = self.plan.after(epoch, step)
        return out

    def seek(self, epoch: int, step: int) -> None:
        self.cursor = self._ours(epoch, step)

    def __call__(self):
        epoch, step = self.cursor
        records, positions, real = self.plan.batch(epoch, step)
        data, labels = self.source.read(records)
        labels[~real] = -1  # evaluation padding
        batch = (_tensor_list(data), labels.reshape(-1, 1), *self.params(epoch, positions, records, data))
        self._alive.append((batch, data))
        self.scheduled.append((epoch, step))
        self.cursor = self._ours(*self.plan.after(epoch, step))
        return batch


def _tensor_list(data: list):
    """The batch's records as one DALI TensorListCPU sharing their memory (no copy). DALI takes a
    TensorList as it is; a list of arrays it converts sample by sample in Python on the feeding
    thread, about 5 µs more per record (`benchmarks/bench_feed.py`)."""
    from nvidia.dali.tensors import TensorCPU, TensorListCPU

    return TensorListCPU([TensorCPU(d) for d in data], contiguous=False)


class _Stream:
    """One pipeline and its feed. `run()` returns the next batch's DALI outputs, as the pipeline's
    own run() does, and names the records when DALI fails on them; `last` is that batch's
    (epoch, step). Other attributes are the pipeline's."""

    def __init__(self, pipeline, feed: _Feed):
        self.pipeline, self.feed, self.last = pipeline, feed, None

    def run(self):
        try:
            outputs = self.pipeline.run()
        except ImgprepError:
            raise
        except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError, and others from its threads
            raise self._failure(e) from None
        self.last = self.feed.scheduled.popleft()
        return outputs

    def _failure(self, error: Exception) -> ImgprepError:
        if not self.feed.scheduled:
            return ImgprepError(f"DALI failed before reading a batch: {dali_reason(error)}")
        source = self.feed.source
        # DALI may report a batch's failure on a later run: look through every batch it was handed
        for epoch, step in self.feed.scheduled:
            culprit = source.culprit(self.feed.plan.batch(epoch, step)[0])
            if culprit:
                return ImgprepError(f"{source.path}: {culprit}")
        records = self.feed.plan.batch(*self.feed.scheduled[0])[0]
        keys = ", ".join(repr(source.key(i)) for i in records[:8]) + (" ..." if len(records) > 8 else "")
        return ImgprepError(f"{source.path}: DALI failed on the batch holding records {keys}: {dali_reason(error)}")

    def __getattr__(self, name):
        return getattr(self.pipeline, name)


def dali_reason(error: Exception) -> str:
    """DALI's own reason for a failure: "DALI's OPERATOR stopped: CAUSE", without its C++ context, the
    graph's Python traceback and the 'Current pipeline object is no longer valid' epilogue that ends
    its message; for any other error, its last line."""
    text = str(error).strip()
    if "encountered:" in text:
        operator = re.search(r"operator `(?:nvidia\.dali\.fn\.)?([\w.]+)`", text)
        cause = text.split("encountered:", 1)[1]
        cause = re.split(r"C\+\+ context:|Current pipeline object is no longer valid", cause)[0]
        cause = re.sub(r'Assert on "[^"]*" failed: ', "", " ".join(cause.split())).rstrip(". ")
        where = f"DALI's {operator.group(1)}" if operator else "DALI's pipeline"
        return f"{where} stopped: {cause[:400]}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(error).__name__


class Loader:
    """Batches of (images, labels) from an imgprep database through DALI.

    `for images, labels in Loader(db, batch_size=256): ...` yields numpy arrays; use
    `output="torch"` for PyTorch tensors or `output="jax"` for JAX arrays on the pipeline's device.

    The order (`imgprep.loading.plan.EpochPlan`): epoch e visits `permutation(N, seed, e)` (the documented
    SplitMix64 order: the same on every machine and library version), or 0..N-1 without `shuffle`
    (default: shuffled for training, not for evaluation). Shard i of K (`shard_id`/`num_shards`, both
    or neither: then torchrun's RANK/WORLD_SIZE) takes positions i, i+K, ... of it, after the order is made a
    multiple of K long as DistributedSampler does, so every rank runs the same number of steps,
    `len(loader)`, and the last batch of an epoch is partial unless `drop_last`:

    - training: every record at least once per epoch; the only repeats are the (fewer than K)
      samples from the start of the order that even the ranks out. `drop_last` cuts the order to a
      multiple of K instead and yields only full batches.
    - evaluation (`train=False`): every record exactly once across all ranks; where N is not a
      multiple of K, ranks get one padding sample at the end of the epoch, labelled -1:

          correct = total = 0
          for images, labels in Loader(db, train=False):
              real = labels >= 0
              correct += (model(images).argmax(1)[real] == labels[real]).sum()
              total += real.sum()          # then all-reduce correct and total across ranks

    Position: the loader is at (epoch, step) (`loader.epoch`, `loader.step`), where the next batch
    comes from. A `for` runs from there to the end of that epoch; after a whole epoch the loader is at
    (e+1, 0), so the next `for` is the next whole epoch. After a `break` (or an exception) at step s,
    the next `for` finishes epoch e from step s: exactly the batches the uninterrupted epoch would
    have yielded. Batches DALI had prepared ahead are kept for that, or dropped where the position
    moved. `set_epoch(e)` moves to the start of epoch e unless the loader is already in epoch e (so
    calling it after `load_state_dict`, as a torch training loop does, keeps the restored step).

    Restart: `state_dict()` is the position and what fixes the order (seed, N, K, batch size,
    drop_last, shuffle); `load_state_dict(state)` in a new process continues with exactly the records
    (and labels, in order) the interrupted run would have yielded next. The state is the same on
    every rank. Augmentation is reproducible too: every policy's draws (crop positions, mirror flags,
    shorter sides, RandomResizedCrop windows, lighting) come from (seed, epoch, position)
    (`draws`), not from DALI's random generators, so a restart or another
    machine gets the same crops.

    Pixels: the same records, order, labels and crop windows on CPU and GPU, but not always the same
    JPEG-decoded pixel values. DALI's CPU decoder is libjpeg-turbo; on the GPU ('mixed') nvJPEG
    decodes, and DALI splits each batch between the GPU's hardware JPEG decoder (where it has one,
    `hw_decoder_load`, by position in the batch) and its CUDA decoder. The loader asks both for
    libjpeg-turbo's chroma upsampling (`jpeg_fancy_upsampling`), so what remains is the rounding of
    their IDCTs: small differences (the tests allow a mean absolute difference of 1 level of 255 per
    image) between CPU and GPU, between the two GPU decoders, and so between batches that place a
    record differently (another batch size or rank count, the `cpu_share` split). The same batches
    on the same machine give the same pixels; raw records are not decoded and are exact everywhere.

    `device_id` (GPU only): the GPU the pipelines run on; by default the current CUDA device (after
    `torch.cuda.set_device(k)`, GPU k), or under torchrun GPU LOCAL_RANK while the current device is
    still the default 0 (see `choose_device_id`). Torch output lands on that GPU.

    `policy` (see `policies`): None ("caffe" for training, "center" for evaluation), a name, or a
    `policies.Policy`. "ten-crop" yields (B, 10, C, H, W) images. `channel_order="BGR"` gives Caffe's
    channel order (with std 1, its 0..255 scale).

    `cpu_share` (GPU only; 0 by default) gives that share of each epoch's batches to a second
    pipeline that decodes JPEGs on `cpu_threads` CPU threads and crops/normalises on the GPU, beside
    the GPU-decoding one: the CPU cores that sit idle while the GPU decodes add throughput. Batch s
    goes to the second pipeline when floor((s+1)*share) > floor(s*share); the order is unchanged.

    Bad arguments (`imgprep.loading.options`, the checks CaffeDataset shares) are an `OptionError`, a ValueError
    naming the argument, raised before any pipeline is built.

    Opening reads the database's keys once (see `records.RecordSource`: cheap for LMDB, one read of
    the whole database for LevelDB) and takes the record count from the build manifest where it can.
    A partial build is refused unless `allow_partial=True`.
    """

    def __init__(self, db, *, batch_size: int = 256, train: bool = True, crop: int = 224,
                 resize_shorter: int = 256, normalize="imagenet", dtype: str = "float32",
                 layout: str = "NCHW", device: str = "auto", device_id: int | None = None,
                 seed: int = 0, shard_id: int | None = None, num_shards: int | None = None,
                 num_threads: int | None = None, drop_last: bool = False, output: str = "numpy",
                 prefetch: int = 2, cpu_share: float = 0.0, cpu_threads: int | None = None,
                 shuffle: bool | None = None, allow_partial: bool = False, policy: str | Policy | None = None,
                 channel_order: str = "RGB"):

        if dtype not in ("float32", "float16") or layout not in ("NCHW", "NHWC"):
            raise OptionError("dtype must be float32 or float16, layout NCHW or NHWC")
        if output not in ("numpy", "torch", "jax"):
            raise OptionError("output must be 'numpy', 'torch' or 'jax'")
        if not 0.0 <= cpu_share < 1.0:
            raise OptionError("cpu_share must be in [0, 1)")
        batch_size, prefetch = whole("batch_size", batch_size), whole("prefetch", prefetch)
        seed = whole("seed", seed, 0)
        for name, value in (("num_threads", num_threads), ("cpu_threads", cpu_threads)):
            if value is not None:
                whole(name, value)
        if channel_order not in CHANNEL_ORDERS:
            raise OptionError(f"channel_order must be 'RGB' or 'BGR', not {channel_order!r}")
        self.policy = parse_policy(policy, train, crop, resize_shorter)
        manifest = complete_manifest(Path(db), allow_partial)  # a partial build is refused before the keys are read
        if device == "auto":
            device = "gpu" if gpu_count() > 0 else "cpu"
        if device == "gpu" and gpu_count() == 0:
            raise ImgprepError("device='gpu' but DALI sees no CUDA GPU; use device='cpu' or 'auto'")
        self.device = device
        self.shard_id, self.num_shards = shards(shard_id, num_shards)
        self.batch_size, self.drop_last, self.output, self.train = batch_size, drop_last, output, train
        self._streams: list[_Stream] = []
        self._sources: list[RecordSource] = []
        source = RecordSource(db, detect_backend(db))  # the one pass over the keys
        self._sources.append(source)
        try:
            self.info = database_info(db, allow_partial, records=len(source), manifest=manifest)
            if cpu_share and not self.info.encoded:
                raise ImgprepError("cpu_share splits JPEG decoding; the database holds raw records")
            try:
                self.plan = EpochPlan(len(source), batch_size, self.num_shards, self.shard_id, seed,
                                      train if shuffle is None else shuffle, drop_last, mark_padding=not train)
            except EmptyShard as e:
                raise ImgprepError(f"shard {self.shard_id} of {self.num_shards} would be empty: {e}") from None
            self.epoch_size = self.plan.samples  # samples this rank yields per epoch
            # the policy's draws are part of what a restart reproduces
            self.position = Position(self.plan, {"train": train, "policy": repr(self.policy)})
            self._cpu_share = cpu_share
            gpu = device == "gpu"
            if gpu:
                device_id = choose_device_id(device_id, os.environ, gpu_count(), _current_cuda_device())
            threads = num_threads or max(1, min(8, len(os.sched_getaffinity(0))))
            norm = Normalisation.parse(normalize)
            check_pixels(self.info, self.policy, norm)
            self._warn_if_upscaling()
            graph_args = dict(info=self.info, policy=self.policy, norm=norm, dtype=dtype, layout=layout, gpu=gpu,
                              channel_order=channel_order)
            base_mean = output_mean_std(norm, self.info.channels, channel_order)[0]
            params = _policy_params(self.policy, self.plan.seed, base_mean, channel_order, source)
            # DALI's static executor: 17-20% faster in CPU mode (2 cores, DALI 2.4), but it reuses its output
            # buffers, so CPU batches are copied out (`_to_numpy`). GPU batches are copied anyway.
            pipeline_args = dict(batch_size=batch_size, device_id=device_id if gpu else None, seed=seed,
                                 prefetch_queue_depth=prefetch, exec_dynamic=gpu)
            # [0] or [0, 1]: step 0 is pipeline 0's
            for index in sorted({self._pipeline_of(step) for step in range(self.plan.steps)}):
                feed = _Feed(self.plan, source, params, index, self._pipeline_of, keep=prefetch + 2)
                n_threads = threads if index == 0 else cpu_threads or threads
                self._streams.append(_Stream(_build_pipeline(graph_args, pipeline_args, n_threads, feed, index == 1),
                                             feed))
        except BaseException:
            self.close()
            raise

    def _warn_if_upscaling(self) -> None:
        """Once per loader: the policy resizes records to a shorter side larger than they have."""
        largest, stored = self.policy.largest_shorter_side, self.info.shorter_side
        if largest and stored and largest > stored:
            warnings.warn(f"the {self.policy.name!r} policy resizes to a shorter side of up to {largest}, but "
                          f"{self.info.path}'s records have {stored}: they are upscaled. Build records at least "
                          f"that large (imgprep build-lmdb --preset resnet480 for shorter side 480)",
                          UpscaleWarning, stacklevel=3)

    def _pipeline_of(self, step: int) -> int:
        """Which pipeline runs batch `step`: 0, or with `cpu_share` 1 for that share of the steps."""
        return split_steps(self._cpu_share, step) if self._cpu_share else 0

    @property
    def pipeline(self):
        """The (first) pipeline, for callers that drive it directly: `run()` gives its next batch's
        DALI outputs (in the loader's order, from its position; iterating the loader afterwards
        drops what was run ahead)."""
        return self._streams[0]

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self.position.epoch

    @property
    def step(self) -> int:
        """The step (batch index within the epoch) the next batch is."""
        return self.position.step

    def set_epoch(self, epoch: int) -> None:
        """Moves to the start of `epoch`, unless the loader is already in it (see the class docstring)."""
        self.position.set_epoch(epoch)

    def state_dict(self) -> dict:
        """The loader's position and what fixes its order; JSON-serialisable, the same on every rank."""
        return self.position.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Continues from `state` (from `state_dict()`, possibly another process's or rank's)."""
        self.position.load_state_dict(state)

    def close(self) -> None:
        """Releases the pipelines and the database handle (LevelDB allows one per process)."""
        for stream in self._streams:  # first: DALI reads the records in place, in LMDB's map
            stream.pipeline._shutdown()  # what the pipeline's own __del__ calls; a traceback may hold it longer
        self._streams = []
        for source in self._sources:
            source.close()
        self._sources = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self) -> int:
        """Steps per epoch, equal on every rank."""
        return self.plan.steps

    def __iter__(self):
        """The batches from the loader's position to the end of its epoch (see the class docstring)."""
        return self._run_epoch(self.position.epoch_steps())

    def _run_epoch(self, steps):
        self._align()
        for epoch, step in steps:
            stream = self._streams[self._pipeline_of(step)]
            images, labels = stream.run()
            if stream.last != (epoch, step):  # cannot happen unless DALI returns batches out of order
                raise RuntimeError(f"loader out of step: batch {stream.last} came for {(epoch, step)}")
            self.position.advance()
            labels = self._convert(labels).reshape(-1)
            yield self._convert(images), labels.long() if self.output == "torch" else labels

    def _align(self) -> None:
        """Makes the batches DALI scheduled ahead the ones the position needs: kept when they are,
        run and dropped when the position moved (set_epoch, load_state_dict, a direct pipeline.run())."""
        epoch, step = self.position.epoch, self.position.step
        for stream in self._streams:
            feed = stream.feed
            if list(feed.scheduled) == feed.upcoming(epoch, step, len(feed.scheduled)):
                if not feed.scheduled:
                    feed.seek(epoch, step)
                continue
            feed.seek(epoch, step)
            for _ in range(len(feed.scheduled)):
                stream.run()

    def _convert(self, tensor_list):
        if self.output == "torch":
            return _to_torch(tensor_list)
        if self.output == "jax":
            return _to_jax(tensor_list)
        return _to_numpy(tensor_list)


def _policy_params(policy: Policy, seed: int, base_mean, channel_order: str, source: RecordSource):
    """The feed's per-batch `params(epoch, positions, records, data)`: the policy's draws for those samples."""
    def params(epoch, positions, records, data):
        sizes = source.sizes(records, data) if "roi_start" in policy.params() else None
        return batch_params(policy, seed, epoch, positions, sizes, base_mean, channel_order)
    return params


def _build_pipeline(graph_args: dict, pipeline_args: dict, threads: int, feed: _Feed, decode_on_cpu: bool):
    from nvidia.dali import pipeline_def

    @pipeline_def(num_threads=threads, **pipeline_args)
    def pipeline():
        return graph(**graph_args, feed=feed, decode_on_cpu=decode_on_cpu)

    built = pipeline()
    built.build()
    return built


def choose_device_id(requested: int | None, env, visible: int, current: int | None) -> int:
    """The GPU a loader's pipelines run on, given `requested` (the `device_id` argument), the
    environment `env`, the number of `visible` GPUs and the `current` CUDA device (None: unknown):

    - `requested` when given;
    - else the current CUDA device, as DALI itself defaults (after `torch.cuda.set_device(k)`, k);
    - except under torchrun (LOCAL_RANK=k) while the current device is still the default 0 and
      GPU k is visible: GPU k, the rank's own GPU where every rank sees every GPU. Where each rank
      sees only its own GPU (CUDA_VISIBLE_DEVICES per rank), that GPU is 0, whatever LOCAL_RANK is.

    An id that is not a visible GPU is an ImgprepError naming the GPUs there are."""
    seen = f"{visible} GPU(s) visible"
    if "CUDA_VISIBLE_DEVICES" in env:
        seen += f" (CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']!r})"
    if visible < 1:
        raise ImgprepError(f"the loader needs a GPU and there is none: {seen}")
    ids = "id 0" if visible == 1 else f"ids 0..{visible - 1}"
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, (int, np.integer)) or not 0 <= requested < visible:
            raise ImgprepError(f"device_id {requested!r} is not a GPU of this process: {seen}, {ids}")
        return int(requested)
    device = 0 if current is None else current
    local = env.get("LOCAL_RANK")
    if device == 0 and local not in (None, ""):
        try:
            rank = int(local)
        except ValueError:
            raise ImgprepError(f"LOCAL_RANK={local!r} is not a GPU index; pass device_id") from None
        if 0 < rank < visible:
            device = rank
    if not 0 <= device < visible:
        raise ImgprepError(f"the current CUDA device {device} is not a GPU of this process: {seen}, {ids}; "
                           "pass device_id")
    return device


def _current_cuda_device() -> int | None:
    """torch's current CUDA device where torch has initialised CUDA, else the CUDA runtime's
    (cudaGetDevice, through DALI); None where neither can say."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_initialized():
            return int(torch.cuda.current_device())
        from nvidia.dali.backend import GetCUDACurrentDevice

        return int(GetCUDACurrentDevice())
    except Exception:  # noqa: BLE001 - no driver: the caller falls back to GPU 0
        return None


def _on_gpu(tensor_list) -> bool:
    from nvidia.dali.backend import TensorListGPU

    return isinstance(tensor_list, TensorListGPU)


def _to_numpy(tensor_list, copy: bool = True) -> np.ndarray:
    """A numpy batch; copied out of a CPU pipeline's buffers, which its executor reuses."""
    if _on_gpu(tensor_list):
        return np.asarray(tensor_list.as_cpu().as_tensor())
    return np.array(tensor_list.as_tensor(), copy=copy)


def _to_torch(tensor_list):
    import torch

    if not _on_gpu(tensor_list):
        return torch.from_numpy(_to_numpy(tensor_list))
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    tensor = tensor_list.as_tensor()
    device = torch.device("cuda", tensor_list.device_id())  # the pipeline's GPU, whatever torch's current one is
    out = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device=device)
    feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(device))
    return out


def _to_jax(tensor_list):
    """A JAX array on the pipeline's device; copied, because DALI reuses its output buffers."""
    import jax
    import jax.numpy as jnp

    if not _on_gpu(tensor_list):
        return jnp.asarray(_to_numpy(tensor_list, copy=False))
    return jax.dlpack.from_dlpack(tensor_list.as_tensor()).copy()


def gpu_count() -> int:
    """CUDA GPUs DALI sees; 0 without a driver or CUDA (the loader then runs in DALI's CPU mode)."""
    try:
        from nvidia.dali.backend import GetCUDADeviceCount

        return GetCUDADeviceCount()
    except Exception:  # no driver, no CUDA: DALI's CPU mode
        return 0
