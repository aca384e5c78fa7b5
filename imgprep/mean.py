"""`compute-mean`: the exact mean image of a database, as a Caffe `.binaryproto`.

Pixels are summed in integers (uint32 within a task, uint64 across tasks), so the mean is
exact at any N; Caffe's compute_image_mean sums in float32 and drifts once 255*N passes
2^24 (about 65k images). Work is split into tasks of consecutive records: LMDB workers open
the database themselves (it is memory-mapped and multi-reader); LevelDB allows one process,
so its values are read here and shipped to the workers.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from . import ImgprepError
from .build import datum_shape
from .codec import RecordError, decode_blob, decode_datum, encode_blob
from .imageops import (ImageFailure, ImageSpec, ResizePolicy, bgr_chw_to_rgb_hwc, center_crop,
                       decode_upright, to_bgr_chw)
from .manifest import read_manifest, record_count, refuse_overlaps, require_complete
from .parallel import ordered_map, resolve_jobs
from .progress import Progress
from .storage import Reader, detect_backend

TASK_RECORDS = 512


@dataclass(frozen=True)
class MeanTransform:
    """What happens to each record before it is summed: resize policy, then center crop."""

    resize: ResizePolicy = ResizePolicy("none")
    crop: int | None = None

    def apply(self, value: bytes) -> np.ndarray:
        """A record -> (C, H, W) uint8 BGR."""
        datum = decode_datum(value)
        if datum.encoded:
            try:
                gray = (datum.channels or datum_shape(datum)[0]) == 1  # Caffe's encoded records omit channels
                img = decode_upright(datum.data, ImageSpec(self.resize, gray=gray))[1]
            except ImageFailure as e:
                raise RecordError(f"encoded image does not decode: {e}") from None
            chw = to_bgr_chw(img)
        else:
            chw = datum.pixels()
            if self.resize.kind != "none":
                rgb = Image.fromarray(bgr_chw_to_rgb_hwc(chw))
                w, h = self.resize.target_size(*rgb.size)
                chw = to_bgr_chw(rgb.resize((w, h), Image.BILINEAR))
        if self.crop:
            chw = np.ascontiguousarray(center_crop(chw.transpose(1, 2, 0), self.crop).transpose(2, 0, 1))
        return chw


@dataclass
class MeanResult:
    sums: np.ndarray  # uint64 (C, H, W), BGR planar
    count: int

    @property
    def mean(self) -> np.ndarray:
        """float64 (C, H, W) mean image, BGR planar (Caffe's layout)."""
        return self.sums / self.count

    @property
    def channel_means_bgr(self) -> list[float]:
        return [float(self.sums[c].sum()) / (self.count * self.sums[c].size) for c in range(self.sums.shape[0])]

    def values(self) -> dict:
        bgr = self.channel_means_bgr
        return {"count": self.count, "shape_chw": list(self.sums.shape), "bgr": bgr, "rgb": bgr[::-1]}


def _sum_values(values, transform: MeanTransform, shape):
    acc = None
    count = 0
    for key, value in values:
        try:
            chw = transform.apply(value)
        except RecordError as e:
            raise ImgprepError(f"record {bytes(key)[:60]!r}: {e}") from None
        if chw.shape != shape:
            return ("mismatch", bytes(key), chw.shape)
        if acc is None:
            acc = np.zeros(shape, np.uint32)
        acc += chw
        count += 1
    return ("ok", acc.astype(np.uint64) if acc is not None else None, count)


def sum_task(task, transform: MeanTransform, shape):
    """Worker: one task is ("lmdb", path, start_key, n) or ("values", [(key, value)...]).

    The LMDB is opened per task and closed after it: a map kept open would hold every page the
    worker has read in its resident set, which loky's leak check mistakes for a leak."""
    if task[0] == "values":
        return _sum_values(task[1], transform, shape)
    _, path, start, n = task
    with Reader(path, "lmdb") as reader:
        return _sum_values(itertools.islice(reader.items(start), n), transform, shape)


def _tasks(reader: Reader):
    """LMDB is multi-reader, so workers open it themselves; LevelDB allows one process, so its
    values are read here and shipped."""
    if reader.backend == "lmdb":
        start, n = None, 0
        for key in reader.keys():
            if n == 0:
                start = key
            n += 1
            if n == TASK_RECORDS:
                yield ("lmdb", str(reader.path), start, n)
                n = 0
        if n:
            yield ("lmdb", str(reader.path), start, n)
    else:
        batch = []
        for item in reader.items():
            batch.append(item)
            if len(batch) == TASK_RECORDS:
                yield ("values", batch)
                batch = []
        if batch:
            yield ("values", batch)


def compute_mean(db, transform: MeanTransform = MeanTransform(), jobs: int | None = None,
                 scheduler: str | None = None, show_progress: bool = True,
                 allow_partial: bool = False) -> MeanResult:
    db = Path(db)
    detect_backend(db)
    manifest = read_manifest(db)
    require_complete(db, manifest, allow_partial)
    with Reader(db) as reader:
        total = record_count(reader, manifest)
        if total == 0:
            raise ImgprepError(f"{db} holds no records")
        first_key, first_value = next(reader.items())
        try:
            shape = transform.apply(first_value).shape
        except RecordError as e:
            raise ImgprepError(f"{db} does not hold Caffe Datum records (first key {first_key[:40]!r}: {e})") from None
        sums = np.zeros(shape, np.uint64)
        count = 0
        progress = Progress("compute-mean", total, enabled=show_progress)
        jobs = resolve_jobs(jobs)
        if jobs == 1 and scheduler is None:  # in-process: stream records straight from the cursor
            items = reader.items()
            results = (_sum_values(itertools.islice(items, TASK_RECORDS), transform, shape)
                       for _ in range(math.ceil(total / TASK_RECORDS)))
        else:
            results = ordered_map(sum_task, _tasks(reader), jobs,
                                  scheduler=scheduler, transform=transform, shape=shape)
        for status, payload, n in results:
            if status == "mismatch":
                c, h, w = shape
                raise ImgprepError(
                    f"records differ in size: {first_key.decode(errors='replace')} is {w}x{h}x{c}, "
                    f"{payload.decode(errors='replace')} is {n[2]}x{n[1]}x{n[0]}. Caffe's compute_image_mean "
                    "refuses this too; pass --crop 224 for a crop-sized mean (as caffe-pro's) or "
                    "--resize squash:256x256 for a stored-size one")
            if payload is not None:
                sums += payload
                count += n
            progress.update(n)
    result = MeanResult(sums, count)
    bgr = ", ".join(f"{v:.3f}" for v in result.channel_means_bgr)
    progress.finish(f"compute-mean: {count:,} records of {shape[2]}x{shape[1]}x{shape[0]} in "
                    f"{progress.elapsed:.1f}s ({progress.rate:,.0f} img/s); channel means (BGR) {bgr}")
    return result


def check_arguments(dbs, out, values_out=None) -> None:
    """Before any work: each database counts once, and no output lands inside a database."""
    refuse_overlaps([Path(db) for db in dbs], [Path(p) for p in (out, values_out) if p], "database")


def combine(results: list[MeanResult]) -> MeanResult:
    """Exact mean over several databases (the parts of a sharded build): integer sums add."""
    shapes = {r.sums.shape for r in results}
    if len(shapes) != 1:
        raise ImgprepError(f"the databases' mean images differ in size: {sorted(shapes)}")
    return MeanResult(sum(r.sums for r in results), sum(r.count for r in results))


def write_mean(result: MeanResult, path, values_out=None) -> None:
    Path(path).write_bytes(encode_blob(result.mean.astype(np.float32)))
    if values_out:
        values = result.values()
        if str(values_out).endswith(".json"):
            Path(values_out).write_text(json.dumps(values, indent=2) + "\n")
        else:
            Path(values_out).write_text(
                f"count {values['count']}\nbgr {' '.join(f'{v:.6f}' for v in values['bgr'])}\n"
                f"rgb {' '.join(f'{v:.6f}' for v in values['rgb'])}\n")


def load_mean(path) -> np.ndarray:
    """A `.binaryproto` -> float32 (C, H, W) mean image, BGR planar (Caffe's layout)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ImgprepError(f"cannot read mean file {path}: {e.strerror}") from None
    try:
        return decode_blob(data)
    except RecordError as e:
        raise ImgprepError(f"{path} is not a valid .binaryproto mean: {e}") from None
