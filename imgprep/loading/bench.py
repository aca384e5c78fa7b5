"""`bench-loader`: loader throughput after a warm-up, next to the peers a user would otherwise pick,
measured in the same run on the same images.

Every row runs with the batch asked for, or with every image in one batch where its source holds
fewer (the row's `batch` says which). The original images of `--compare` are checked first: a file
that would stop DALI's reader or a DataLoader worker (empty, not an image, truncated) is skipped,
and the rows on the originals say how many were."""

from __future__ import annotations

import gc
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from imgprep import ImgprepError
from imgprep.loading.loader import Loader, UpscaleWarning, dali_reason
from imgprep.loading.policies import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB
from imgprep.formats.database import database_info


@dataclass
class BenchRow:
    """One row of the table: a source's rate, or (images_per_s None) why it could not run."""

    source: str
    images_per_s: float | None  # None: the source could not run; `note` says why
    ms_per_batch: float | None
    batches: int
    note: str = ""
    batch: int = 0  # the images per batch it ran with (0: it did not run)


def time_batches(step, batch_size: int, seconds: float, warmup: int) -> tuple[float, float, int]:
    """Calls step() (one batch; a DALI pipeline's run returns once the batch is ready, on CPU or
    GPU) `warmup` times, then for `seconds`; returns (img/s, ms/batch, n)."""
    for _ in range(warmup):
        step()
    n = 0
    start = time.perf_counter()
    while True:
        step()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return n * batch_size / elapsed, 1000 * elapsed / n, n


def _policy(images, fn, types, train, gpu):
    """The training (or eval) policy on decoded images, as the peers run it."""
    images = fn.resize(images, resize_shorter=256, antialias=True)
    crop_x = fn.random.uniform(range=(0.0, 1.0)) if train else 0.5
    crop_y = fn.random.uniform(range=(0.0, 1.0)) if train else 0.5
    mirror = fn.random.coin_flip(probability=0.5) if train else 0
    return fn.crop_mirror_normalize(images, crop=(224, 224), crop_pos_x=crop_x, crop_pos_y=crop_y, mirror=mirror,
                                    mean=list(IMAGENET_MEAN_RGB), std=list(IMAGENET_STD_RGB),
                                    dtype=types.FLOAT16 if gpu else types.FLOAT, output_layout="CHW")


def file_reader_pipeline(samples: list[tuple[str, int]], batch: int, threads: int, gpu: bool, train: bool):
    """DALI's file reader over the original images `samples` ((path, label) pairs), with the same policy."""
    from nvidia.dali import fn, pipeline_def, types

    files, labels = [path for path, _ in samples], [label for _, label in samples]

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=0 if gpu else None, seed=0)
    def pipe():
        jpegs, labels_out = fn.readers.file(files=files, labels=labels, random_shuffle=train, name="Reader")
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
        return _policy(images, fn, types, train, gpu), labels_out

    p = pipe()
    p.build()
    return p


def decode_only_pipeline(db: Path, batch: int, threads: int, gpu: bool):
    """Reader + decoder alone over the same LMDB: the ceiling the full policy is measured against."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=0 if gpu else None, seed=0)
    def pipe():
        jpegs, labels = fn.readers.caffe(path=str(db), random_shuffle=False, name="Reader")
        return fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB), labels

    p = pipe()
    p.build()
    return p


def _cycling(loader, on_epoch=None):
    """step(): the DataLoader's next batch, starting its next epoch when one ends (on a GPU machine
    the batch is copied to the GPU, as a trainer would)."""
    import torch

    if len(loader) == 0:
        raise ImgprepError("fewer images than one batch; use a smaller --batch")
    epoch = 0
    iterator = iter(loader)

    def close():  # the workers stop with their iterator, before the next peer forks its own
        nonlocal iterator
        iterator = None
        gc.collect()

    def step():
        nonlocal iterator, epoch
        try:
            images, _ = next(iterator)
        except StopIteration:
            epoch += 1
            if on_epoch:
                on_epoch(epoch)
            iterator = iter(loader)
            images, _ = next(iterator)
        if torch.cuda.is_available():
            images.cuda(non_blocking=True)
    step.close = close
    return step


def _data_loader(dataset, batch: int, workers: int, train: bool):
    """A DataLoader as a trainer makes one: whole batches, persistent workers, pinned memory on a GPU machine."""
    import torch

    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=train, num_workers=workers,
                                       pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                                       drop_last=True)


def dataset_step(db: Path, batch: int, workers: int, train: bool, allow_partial: bool = False):
    """imgprep's CaffeDataset (Pillow decoding, the loader's policy) through a DataLoader."""
    from imgprep.loading.dataset import LEVELDB_WORKERS, CaffeDataset

    dataset = CaffeDataset(db, train=train, allow_partial=allow_partial)
    if dataset.backend == "leveldb" and workers > 1:
        raise ImgprepError(LEVELDB_WORKERS.replace("num_workers=0 or 1", "--torch-workers 0 or 1"))
    return _cycling(_data_loader(dataset, batch, workers, train), dataset.set_epoch)


def folder_step(samples, batch: int, workers: int, train: bool, transform):
    """The original files through a DataLoader whose workers decode with Pillow and apply `transform`."""
    from imgprep.loading.peers import ImageFiles

    return _cycling(_data_loader(ImageFiles(samples, transform), batch, workers, train))


_DALI_HINTS = {"File mapping failed": "DALI's file reader cannot read an empty file",
               "No files found": "no images in the folder's class subfolders",
               "nvImageCodec failure": "a file there is not an image DALI can decode (corrupt, truncated or "
                                       "another format); imgprep build-lmdb lists such files in its failure report",
               "Unrecognized image format": "a file there is not an image DALI can decode"}


def explain_failure(error: BaseException) -> str:
    """A peer's exception in words a user understands: DALI's cause without its C++ context and
    'pipeline no longer valid' epilogue, a DataLoader worker's error without the traceback."""
    text = str(error).strip()
    if "encountered:" in text:
        reason = dali_reason(error)
        hint = next((h for k, h in _DALI_HINTS.items() if k in reason), None)
        return reason + (f" ({hint})" if hint else "")
    if text.startswith("Caught ") and "Original Traceback" in text:
        return "a DataLoader worker failed: " + text.splitlines()[-1].removeprefix("imgprep.ImgprepError: ")
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _measure_peer(rows, name, make_step, batch, seconds, warmup, note: str = ""):
    """A peer that cannot run (DALI's file reader on a zero-byte file, LevelDB with several workers,
    no torch) gives a row that says why, with no rate, instead of ending the benchmark."""
    step = None
    try:
        step = make_step()
        rate, ms, n = time_batches(step, batch, seconds, warmup)
    except ImportError as e:
        rows.append(BenchRow(name, None, None, 0, _joined(f"cannot run: {e.name or 'a module'} is not installed",
                                                          note)))
    except Exception as e:  # a peer's own failure, whatever its kind, is reported in its row
        rows.append(BenchRow(name, None, None, 0, _joined("cannot run: " + explain_failure(e)[:300], note)))
    else:
        rows.append(BenchRow(name, rate, ms, n, note, batch))
    finally:
        getattr(step, "close", gc.collect)()


def _time_loader(loader, batch, seconds, warmup) -> tuple[float, float, int]:
    """Batches from the loader's own iterator (every pipeline it runs), across epochs."""
    def batches():
        while True:
            yield from loader
    it = batches()
    return time_batches(lambda: next(it), batch, seconds, warmup)


def _joined(*parts: str) -> str:
    """The non-empty parts of a note, joined by '; '."""
    return "; ".join(part for part in parts if part)


def fitting_batch(batch: int, images: int, what: str = "images") -> tuple[int, str]:
    """(the batch a source of `images` images runs with: `batch`, or all of them where it holds fewer;
    the note that says so, or '')."""
    if 0 < images < batch:
        return images, f"a batch of all {images} {what} (fewer than {batch})"
    return batch, ""


def _loader_rate(db, batch, threads, device, seconds, warmup, policy, allow_partial=False):
    """(img/s, ms/batch, batches, on a GPU, device) of the loader's own pipeline with `policy`; on a GPU
    with fp16 output, what a GPU trainer takes (a CPU trainer takes fp32, and x86 converts to fp16 slowly).
    One shard, whatever torchrun's RANK and WORLD_SIZE say."""
    from imgprep.loading.loader import gpu_count

    gpu = device == "gpu" or (device == "auto" and gpu_count() > 0)
    with Loader(db, batch_size=batch, train=policy.train, device=device, num_threads=threads, policy=policy,
                dtype="float16" if gpu else "float32", shard_id=0, num_shards=1, allow_partial=allow_partial) as loader:
        rate, ms, n = time_batches(loader.pipeline.run, batch, seconds, warmup)
        return rate, ms, n, gpu, loader.device


def bench_loader(db, batch: int = 256, threads: int | None = None, device: str = "auto", seconds: float = 10.0,
                 train: bool = True, compare: Path | None = None, compare_list: Path | None = None,
                 warmup: int = 3, torch_workers: int | None = None, cpu_share: float = 0.0,
                 cpu_threads: int | None = None, policies: list[str] | None = None,
                 allow_partial: bool = False) -> list[BenchRow]:
    """The rows of `bench-loader`: one loader row per policy in `policies` (default: the training or
    evaluation policy `train` picks), then the peers, with `train`'s policy or the first policy's. The
    loader reads the whole database, as one shard; an incomplete build is refused unless `allow_partial`."""
    from imgprep.loading.policies import parse_policy, policy as make_policy

    threads = threads or max(1, min(8, len(os.sched_getaffinity(0))))
    info = database_info(db, allow_partial)
    asked, (batch, fits) = batch, fitting_batch(batch, info.records, "records")
    rows = []
    chosen = [make_policy(name) for name in policies] if policies else [parse_policy(None, train)]
    train = chosen[0].train
    gpu = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UpscaleWarning)  # a rate is measured whatever the records' size
        for policy in chosen:
            rate, ms, n, gpu, device_name = _loader_rate(db, batch, threads, device, seconds, warmup, policy,
                                                         allow_partial)
            label = ("training" if policy.train else "eval") if not policies else policy.name
            note = "fp16 NCHW" if gpu else "fp32 NCHW"
            note += f", {policy.views} views per image" if policy.views > 1 else ""
            rows.append(BenchRow(f"imgprep loader ({label} policy, {device_name})", rate, ms, n,
                                 _joined(note, fits), batch))
    if cpu_share:
        with Loader(db, batch_size=batch, train=train, device=device, num_threads=threads,
                    dtype="float16" if gpu else "float32", cpu_share=cpu_share, cpu_threads=cpu_threads,
                    output="torch" if gpu else "numpy", policy=chosen[0], shard_id=0, num_shards=1,
                    allow_partial=allow_partial) as split:
            rate, ms, n = _time_loader(split, batch, seconds, warmup)
        rows.append(BenchRow(f"imgprep loader, {cpu_share:.0%} of records decoded on CPU threads", rate, ms, n,
                             _joined(f"{cpu_threads or threads} CPU decode threads beside {threads}", fits), batch))
    if info.encoded and info.backend == "lmdb":
        _measure_peer(rows, "same LMDB, read + decode only",
                      lambda: decode_only_pipeline(Path(db), batch, threads, gpu).run, batch, seconds, warmup,
                      note=_joined("the decode ceiling", fits))
    workers = torch_workers if torch_workers is not None else threads
    _measure_peer(rows, f"imgprep CaffeDataset, same DB, DataLoader with {workers} workers",
                  lambda: dataset_step(Path(db), batch, workers, train, allow_partial), batch, seconds, 1, fits)
    if compare is not None:
        _compare_originals(rows, Path(compare), compare_list, asked, threads, workers, gpu, train, seconds, warmup)
    return rows


def _compare_originals(rows, root: Path, list_file, batch, threads, workers, gpu, train, seconds, warmup):
    """DALI's file reader and a torchvision DataLoader on the original images, same policy; the files
    neither could read are skipped first, and counted in the rows' notes."""
    from imgprep.loading.peers import (PillowTransform, describe_skipped, image_files, readable_originals,
                                       torchvision_transform)

    if not root.is_dir():
        raise ImgprepError(f"--compare {root} is not a folder of original images")
    policy = "training" if train else "eval"
    try:
        samples, unusable = image_files(root, list_file), None
    except (ImgprepError, OSError) as e:  # a list entry that is a FIFO, say: the peers cannot read it
        samples, unusable = [], str(e)
    peers = []  # (row name, transform) of each torchvision variant: torchvision's own where it imports
    for resized_crop in ([False, True] if train else [False]):
        transform = torchvision_transform(train, resized_crop, IMAGENET_MEAN_RGB, IMAGENET_STD_RGB)
        name = "torchvision DataLoader" if transform else "torchvision-style DataLoader (Pillow, no torchvision)"
        peers.append((name + f", original JPEGs, {workers} workers" + (", RandomResizedCrop" if resized_crop else ""),
                      transform or PillowTransform(train, resized_crop, IMAGENET_MEAN_RGB, IMAGENET_STD_RGB)))
    dali = f"DALI file reader, original JPEGs ({policy})"
    samples, skipped = readable_originals(samples, threads)
    said = describe_skipped(skipped)
    if not samples:
        where = "the list's entries" if list_file else "class subfolders (ROOT/<class>/<image>)"
        why = unusable or (f"no readable images in {root}'s {where}" if skipped else f"no images in {root}'s {where}")
        for name in [dali] + [name for name, _ in peers]:
            rows.append(BenchRow(name, None, None, 0, _joined(f"cannot run: {why}", said)))
        return
    batch, fits = fitting_batch(batch, len(samples), "readable images" if skipped else "images")
    note = _joined(said, fits)
    _measure_peer(rows, dali, lambda: file_reader_pipeline(samples, batch, threads, gpu, train).run,
                  batch, seconds, warmup, note)
    for name, transform in peers:
        _measure_peer(rows, name, lambda: folder_step(samples, batch, workers, train, transform), batch, seconds, 1,
                      note)


def format_table(rows: list[BenchRow]) -> str:
    """Markdown rows: each source's batch, img/s, ms per batch and img/s as a multiple of the first
    row's (the column 'x <first row's source>': 2.00 is twice as fast, 0.50 half as fast). A source
    that could not run shows '-' and its reason, never a rate of 0."""
    base = rows[0].images_per_s if rows else None
    baseline = rows[0].source if rows and base else "the first row"
    lines = [f"| source | batch | img/s | ms/batch | x {baseline} | note |", "|---|---:|---:|---:|---:|---|"]
    for row in rows:
        if row.images_per_s is None:
            lines.append(f"| {row.source} | - | - | - | - | {row.note} |")
            continue
        ratio = f"{row.images_per_s / base:.2f}" if base else "-"
        lines.append(f"| {row.source} | {row.batch or '-'} | {row.images_per_s:,.0f} | {row.ms_per_batch:.1f} "
                     f"| {ratio} | {row.note} |")
    return "\n".join(lines)


def rows_to_dicts(rows: list[BenchRow]) -> list[dict]:
    """The rows as JSON-ready dicts (BenchRow's fields)."""
    return [asdict(r) for r in rows]
