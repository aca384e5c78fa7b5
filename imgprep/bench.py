"""`bench-loader`: loader throughput after a warm-up, next to the peers a user would otherwise pick,
measured in the same run on the same images."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import ImgprepError
from .loader import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, Loader, database_info


@dataclass
class BenchRow:
    source: str
    images_per_s: float
    ms_per_batch: float
    batches: int
    note: str = ""


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


def file_reader_pipeline(root: Path, list_file: Path | None, batch: int, threads: int, gpu: bool, train: bool):
    """DALI's file reader over the original JPEGs, with the same policy."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=0 if gpu else None, seed=0)
    def pipe():
        kwargs = {"file_list": str(list_file)} if list_file else {}
        jpegs, labels = fn.readers.file(file_root=str(root), random_shuffle=train, name="Reader", **kwargs)
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
        return _policy(images, fn, types, train, gpu), labels

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


def torchvision_step(root: Path, list_file: Path | None, batch: int, workers: int, train: bool):
    """A torchvision DataLoader (ImageFolder, or the list's files) with the same policy, or None
    if torchvision is absent."""
    try:
        import torch
        from torchvision import datasets, transforms
    except Exception:  # torchvision missing or not importable beside this torch
        return None
    crop = transforms.RandomCrop(224) if train else transforms.CenterCrop(224)
    steps = [transforms.Resize(256), crop] + ([transforms.RandomHorizontalFlip()] if train else [])
    steps += [transforms.ToTensor(), transforms.Normalize([m / 255 for m in IMAGENET_MEAN_RGB],
                                                          [s / 255 for s in IMAGENET_STD_RGB])]
    transform = transforms.Compose(steps)
    if list_file is None:
        dataset = datasets.ImageFolder(str(root), transform)
    else:
        from .lists import read_list

        entries = read_list(list_file)
        samples = [(str(root / p), int(l)) for p, l in zip(entries.paths, entries.labels)]
        dataset = datasets.DatasetFolder.__new__(datasets.DatasetFolder)
        dataset.loader, dataset.transform, dataset.target_transform = datasets.folder.default_loader, transform, None
        dataset.samples = samples
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=train, num_workers=workers,
                                         pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                                         drop_last=True)
    iterator = iter(loader)

    def step():
        nonlocal iterator
        try:
            images, _ = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            images, _ = next(iterator)
        if torch.cuda.is_available():
            images.cuda(non_blocking=True)
    return step


def _measure_peer(rows, name, make_step, batch, seconds, warmup):
    """A peer that cannot run on these images (e.g. DALI's file reader on a zero-byte file) gives a
    row that says so instead of ending the benchmark."""
    try:
        step = make_step()
        if step is None:
            rows.append(BenchRow(name, 0.0, 0.0, 0, "torchvision not installed"))
            return
        rate, ms, n = time_batches(step, batch, seconds, warmup)
        rows.append(BenchRow(name, rate, ms, n))
    except (RuntimeError, OSError) as e:
        rows.append(BenchRow(name, 0.0, 0.0, 0, "failed: " + str(e).strip().splitlines()[-1][:120]))


def _time_loader(loader, batch, seconds, warmup) -> tuple[float, float, int]:
    """Batches from the loader's own iterator (every pipeline it runs), across epochs."""
    def batches():
        while True:
            yield from loader
    it = batches()
    return time_batches(lambda: next(it), batch, seconds, warmup)


def bench_loader(db, batch: int = 256, threads: int | None = None, device: str = "auto", seconds: float = 10.0,
                 train: bool = True, compare: Path | None = None, compare_list: Path | None = None,
                 warmup: int = 3, torch_workers: int | None = None, cpu_share: float = 0.0,
                 cpu_threads: int | None = None) -> list[BenchRow]:
    threads = threads or max(1, min(8, len(os.sched_getaffinity(0))))
    rows = []
    loader = Loader(db, batch_size=batch, train=train, device=device, num_threads=threads)
    gpu = loader.device == "gpu"
    if gpu:  # what a GPU trainer takes; a CPU trainer takes fp32 (and x86 converts to fp16 slowly)
        loader.close()
        loader = Loader(db, batch_size=batch, train=train, device=device, num_threads=threads, dtype="float16")
    policy = "training" if train else "eval"
    rate, ms, n = time_batches(loader.pipeline.run, batch, seconds, warmup)
    rows.append(BenchRow(f"imgprep loader ({policy} policy, {loader.device})", rate, ms, n,
                         "fp16 NCHW" if gpu else "fp32 NCHW"))
    loader.close()
    if cpu_share:
        with Loader(db, batch_size=batch, train=train, device=device, num_threads=threads,
                    dtype="float16" if gpu else "float32", cpu_share=cpu_share, cpu_threads=cpu_threads,
                    output="torch" if gpu else "numpy") as split:
            rate, ms, n = _time_loader(split, batch, seconds, warmup)
        rows.append(BenchRow(f"imgprep loader, {cpu_share:.0%} of records decoded on CPU threads", rate, ms, n,
                             f"{cpu_threads or threads} CPU decode threads beside {threads}"))
    info = database_info(db)
    if info.encoded and info.backend == "lmdb":
        rate, ms, n = time_batches(decode_only_pipeline(Path(db), batch, threads, gpu).run, batch, seconds, warmup)
        rows.append(BenchRow("same LMDB, read + decode only", rate, ms, n, "the decode ceiling"))
    if compare is not None:
        compare = Path(compare)
        if not compare.is_dir():
            raise ImgprepError(f"--compare {compare} is not a folder of original images")
        _measure_peer(rows, f"DALI file reader, original JPEGs ({policy})",
                      lambda: file_reader_pipeline(compare, compare_list, batch, threads, gpu, train).run,
                      batch, seconds, warmup)
        workers = torch_workers if torch_workers is not None else threads
        _measure_peer(rows, f"torchvision DataLoader, original JPEGs, {workers} workers",
                      lambda: torchvision_step(compare, compare_list, batch, workers, train), batch, seconds, 1)
    return rows


def format_table(rows: list[BenchRow]) -> str:
    base = rows[0].images_per_s or 1.0
    lines = ["| source | img/s | ms/batch | imgprep is x faster | note |", "|---|---:|---:|---:|---|"]
    for row in rows:
        ratio = f"{base / row.images_per_s:.2f}" if row.images_per_s else "-"
        lines.append(f"| {row.source} | {row.images_per_s:,.0f} | {row.ms_per_batch:.1f} | {ratio} | {row.note} |")
    return "\n".join(lines)


def rows_to_dicts(rows: list[BenchRow]) -> list[dict]:
    return [asdict(r) for r in rows]
