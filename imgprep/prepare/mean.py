"""`compute-mean`: the exact mean image of a database, as a Caffe `.binaryproto`.

Pixels are summed in integers, so the mean is exact at any N; Caffe's compute_image_mean sums in
float32 and drifts once 255*N passes 2^24 (about 65k images). The sum runs in uint16 blocks of
257 images (257 * 255 = 65,535 cannot overflow; adding uint8 into uint16 is about 2.5x faster than
into uint32) emptied into a uint64 total.

Raw records are summed where they lie: LMDB values are read as buffers straight from the map and
a record that starts with the raw prefix of the first record's shape and ends in only `label` and
`encoded=false` is added without decoding it; anything else goes through `decode_datum`. Locally,
`jobs` threads each sum one contiguous key range into their own accumulator (numpy's add and
Pillow's decoder release the GIL, so no process pool has to start or ship sums back); with a
Dask scheduler the work goes out in tasks of consecutive records.
"""

from __future__ import annotations

import itertools
import json
import math
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgprep import ImgprepError
from imgprep.formats.database import datum_shape
from imgprep.formats.codec import RecordError, decode_datum, encode_blob, is_plain_raw_tail, raw_datum_prefix
from imgprep.formats.resizing import ResizePolicy
from imgprep.formats.files import check_output_file, refuse_overlaps, write_atomic
from imgprep.formats.manifest import read_manifest, record_count, require_complete
from imgprep.prepare.parallel import ordered_map, resolve_jobs
from imgprep.prepare.progress import Progress
from imgprep.formats.storage import Reader, detect_backend

TASK_RECORDS = 512  # records per Dask task
BLOCK = 257  # images per uint16 block: 257 * 255 = 65,535
MIN_RECORDS_PER_THREAD = 2 * BLOCK  # fewer records than this per thread are not worth a thread
KNOWN_TAILS = 4096  # validated raw-record tails remembered (one per label in practice)


@dataclass(frozen=True)
class MeanTransform:
    """What happens to each record before it is summed: resize policy, then center crop."""

    resize: ResizePolicy = ResizePolicy("none")
    crop: int | None = None

    def apply(self, value: bytes) -> np.ndarray:
        """A record -> (C, H, W) uint8 BGR."""
        datum = decode_datum(value)
        if datum.encoded or self.resize.kind != "none" or self.crop:
            return self._transformed(datum)
        return datum.pixels()

    def _transformed(self, datum) -> np.ndarray:
        # Pillow is loaded only for records that need it: raw records summed as stored (compute-mean's
        # usual case) never do, and loading it is ~7% of the whole command on 2,500 records.
        from PIL import Image

        from imgprep.formats.imageops import (ImageFailure, ImageSpec, bgr_chw_to_rgb_hwc, center_crop,
                                              decode_upright, to_bgr_chw)

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
    """Exact per-pixel sums of `count` images (uint64, BGR planar) and the transform they were taken under."""
    sums: np.ndarray  # uint64 (C, H, W), BGR planar
    count: int

    @property
    def mean(self) -> np.ndarray:
        """float64 (C, H, W) mean image, BGR planar (Caffe's layout)."""
        return self.sums / self.count

    @property
    def channel_means_bgr(self) -> list[float]:
        """The mean of each channel over every pixel, in BGR order."""
        return [float(self.sums[c].sum()) / (self.count * self.sums[c].size) for c in range(self.sums.shape[0])]

    def values(self) -> dict:
        """The per-channel means (BGR and RGB) and the count, as --values-out writes them."""
        bgr = self.channel_means_bgr
        return {"count": self.count, "shape_chw": list(self.sums.shape), "bgr": bgr, "rgb": bgr[::-1]}


class SizeMismatch(Exception):
    """A record whose (C, H, W) differs from the first record's."""

    def __init__(self, key: bytes, shape):
        super().__init__(key, shape)
        self.key, self.shape = bytes(key), shape


class ImageSum:
    """Exact running sum of uint8 images of one shape (see the module docstring)."""

    def __init__(self, shape):
        self.shape = tuple(shape)
        size = math.prod(self.shape)
        self.block = np.zeros(size, np.uint16)
        self.in_block = 0
        self.total = np.zeros(size, np.uint64)
        self.count = 0

    def add(self, pixels: np.ndarray) -> None:
        """Adds one image given as a flat (or (C, H, W)) uint8 array."""
        np.add(self.block, pixels.reshape(-1), out=self.block)
        self.in_block += 1
        if self.in_block == BLOCK:
            self.flush()

    def flush(self) -> None:
        """Adds the current uint16 block into the uint64 sums and starts a new block."""
        if self.in_block:
            self.total += self.block
            self.block[:] = 0
            self.count += self.in_block
            self.in_block = 0

    def sums(self) -> np.ndarray:
        """The uint64 sums so far, the open block included."""
        self.flush()
        return self.total.reshape(self.shape)


class RecordPixels:
    """record value -> flat uint8 pixels of `shape`, taken in place for plain raw records."""

    def __init__(self, transform: MeanTransform, shape):
        self.transform, self.shape = transform, tuple(shape)
        size = math.prod(self.shape)
        in_place = transform.resize.kind == "none" and not transform.crop
        self.prefix = raw_datum_prefix(*self.shape) if in_place else None
        self.start = len(self.prefix) if in_place else 0
        self.end = self.start + size
        self.tails: set[bytes] = set()

    def __call__(self, key, value) -> np.ndarray:
        if self.prefix is not None and value[:self.start] == self.prefix and self._plain_tail(value):
            return np.frombuffer(value, np.uint8, self.end - self.start, self.start)
        try:
            chw = self.transform.apply(bytes(value))
        except RecordError as e:
            raise ImgprepError(f"record {bytes(key)[:60]!r}: {e}") from None
        if chw.shape != self.shape:
            raise SizeMismatch(key, chw.shape)
        return chw

    def _plain_tail(self, value) -> bool:
        if len(value) < self.end:
            return False
        tail = bytes(value[self.end:])
        if tail in self.tails:
            return True
        if not is_plain_raw_tail(tail):
            return False
        if len(self.tails) < KNOWN_TAILS:
            self.tails.add(tail)
        return True


def sum_records(items, transform: MeanTransform, shape, stop=None, tick=None) -> ImageSum:
    """Sums (key, value) records; raises SizeMismatch on a record of another shape. `tick(n)` is
    called after every block; a set `stop` event ends the loop early."""
    acc = ImageSum(shape)
    pixels = RecordPixels(transform, shape)
    for key, value in items:
        acc.add(pixels(key, value))
        if acc.in_block == 0:
            if tick:
                tick(BLOCK)
            if stop is not None and stop.is_set():
                break
    if tick:
        tick(acc.in_block)
    acc.flush()
    return acc


def sum_task(task, transform: MeanTransform, shape):
    """Dask worker: one task is ("lmdb", path, start_key, n) or ("values", [(key, value)...]);
    returns ("ok", uint64 sums, count) or ("mismatch", key, shape).

    The LMDB is opened per task and closed after it: a map kept open would hold every page the
    worker has read in its resident set, which loky's leak check mistakes for a leak."""
    try:
        if task[0] == "values":
            acc = sum_records(task[1], transform, shape)
        else:
            _, path, start, n = task
            with Reader(path, "lmdb") as reader:
                acc = sum_records(itertools.islice(reader.items(start, buffers=True), n), transform, shape)
    except SizeMismatch as e:
        return ("mismatch", e.key, e.shape)
    return ("ok", acc.sums(), acc.count)


def _tasks(reader: Reader):
    """LMDB is multi-reader, so workers open it themselves; LevelDB allows one process, so its
    values are read here and shipped."""
    if reader.backend == "lmdb":
        total = len(reader)
        for start, n in _ranges(reader, math.ceil(total / TASK_RECORDS), total):
            yield ("lmdb", str(reader.path), start, n)
    else:
        items = reader.items()
        while batch := list(itertools.islice(items, TASK_RECORDS)):
            yield ("values", batch)


def _ranges(reader: Reader, parts: int, total: int) -> list[tuple[bytes | None, int]]:
    """(first key, record count) of `parts` contiguous key ranges of nearly equal size, of `total` records."""
    bounds = [total * i // parts for i in range(parts + 1)]
    wanted = dict.fromkeys(bounds[1:-1])
    for index, key in enumerate(itertools.islice(reader.keys(), bounds[-2] + 1 if parts > 1 else 0)):
        if index in wanted:
            wanted[index] = key
    starts = [None] + [wanted[b] for b in bounds[1:-1]]
    return [(start, bounds[i + 1] - bounds[i]) for i, start in enumerate(starts) if bounds[i + 1] > bounds[i]]


def _sum_in_threads(reader: Reader, transform, shape, jobs: int, total: int, progress: Progress):
    """Each of `jobs` threads sums one contiguous key range; Ctrl-C stops them at their next block.
    LevelDB is read in one pass by one thread: finding where its ranges start would read its values too."""
    stop, lock = threading.Event(), threading.Lock()

    def tick(n):
        with lock:
            progress.update(n)

    def run(start, n):
        items = reader.items(start, buffers=True)
        try:
            return sum_records(itertools.islice(items, n), transform, shape, stop, tick)
        finally:  # ends its read transaction now, not when a Ctrl-C's traceback is freed after the Reader closed
            items.close()

    ranges = _ranges(reader, jobs if reader.backend == "lmdb" else 1, total)
    if len(ranges) == 1:
        return [run(*ranges[0])]
    with ThreadPoolExecutor(len(ranges), thread_name_prefix="imgprep-mean") as pool:
        futures = [pool.submit(run, start, n) for start, n in ranges]
        try:
            while wait(futures, timeout=0.2, return_when=FIRST_EXCEPTION).not_done:
                if any(f.done() and f.exception() for f in futures):
                    break
        except BaseException:
            stop.set()
            raise
        finally:
            stop.set()
        return [f.result() for f in futures]


def compute_mean(db, transform: MeanTransform = MeanTransform(), jobs: int | None = None,
                 scheduler: str | None = None, show_progress: bool = True,
                 allow_partial: bool = False) -> MeanResult:
    """The exact mean of every record of the database `db` (summed in integers, so exact at any N), as
    `transform` says: the stored size, a center crop (`MeanTransform(crop=224)`) or a squash resize.
    Encoded records are decoded first; records of differing sizes need a crop or a resize. `jobs` threads
    (or the Dask cluster at `scheduler`) sum disjoint key ranges. An incomplete build is refused unless
    `allow_partial`. `write_mean` writes the result as Caffe's `.binaryproto`."""
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
        jobs = min(resolve_jobs(jobs), max(1, total // MIN_RECORDS_PER_THREAD))
        try:
            if scheduler is None:
                for acc in _sum_in_threads(reader, transform, shape, jobs, total, progress):
                    sums += acc.sums()
                    count += acc.count
            else:
                for status, payload, n in ordered_map(sum_task, _tasks(reader), jobs, scheduler=scheduler,
                                                      transform=transform, shape=shape):
                    if status == "mismatch":
                        raise SizeMismatch(payload, n)
                    sums += payload
                    count += n
                    progress.update(n)
        except SizeMismatch as e:
            raise ImgprepError(mismatch_message(first_key, shape, e.key, e.shape, transform)) from None
    result = MeanResult(sums, count)
    bgr = ", ".join(f"{v:.3f}" for v in result.channel_means_bgr)
    progress.finish(f"compute-mean: {count:,} records of {shape[2]}x{shape[1]}x{shape[0]} in "
                    f"{progress.elapsed:.1f}s ({progress.rate:,.0f} img/s); channel means (BGR) {bgr}")
    return result


def mismatch_message(first_key: bytes, shape, key: bytes, other, transform: MeanTransform) -> str:
    """Two records of different (C, H, W): what differs, and the option that helps (if one does)."""
    c, h, w = shape
    text = (f"records differ in size: {first_key.decode(errors='replace')} is {w}x{h}x{c}, "
            f"{key.decode(errors='replace')} is {other[2]}x{other[1]}x{other[0]}. Caffe's compute_image_mean "
            "refuses this too; ")
    if other[0] != c:  # no crop or resize changes the channel count
        return text + ("their channel counts differ (grayscale beside color records), and one mean has one "
                       "channel count: build the database with --gray for every record, or for none")
    if transform.crop:  # center_crop refuses a smaller image, so a crop gives every record one size
        return text + "pass --resize squash:WxH to give every record one size"
    return text + ("pass --crop 224 for a crop-sized mean (as caffe-pro's) or --resize squash:256x256 for a "
                   "stored-size one")


def check_arguments(dbs, out, values_out=None, overwrite: bool = False) -> None:
    """Before any work: each database counts once, no output lands inside a database, and every
    output can be written (its folder exists and is writable; not a link, a folder or a FIFO) and
    does not exist yet, unless `overwrite`."""
    outputs = [Path(p) for p in (out, values_out) if p]
    refuse_overlaps([Path(db) for db in dbs], outputs, "database")
    for path in outputs:
        check_output_file(path, overwrite)


def combine(results: list[MeanResult]) -> MeanResult:
    """Exact mean over several databases (the parts of a sharded build): integer sums add."""
    shapes = {r.sums.shape for r in results}
    if len(shapes) != 1:
        raise ImgprepError(f"the databases' mean images differ in size: {sorted(shapes)}")
    return MeanResult(sum(r.sums for r in results), sum(r.count for r in results))


def write_mean(result: MeanResult, path, values_out=None, overwrite: bool = False) -> None:
    """Writes the mean as a `.binaryproto` at `path` and, with `values_out`, the per-channel means
    (JSON if the name ends in .json, else text); each file atomically (files.write_atomic). An
    existing file is replaced only with `overwrite`; neither is written if one is refused."""
    for output in (path, values_out):
        if output:
            check_output_file(output, overwrite)
    write_atomic(path, encode_blob(result.mean.astype(np.float32)))
    if values_out:
        values = result.values()
        if str(values_out).endswith(".json"):
            text = json.dumps(values, indent=2) + "\n"
        else:
            text = (f"count {values['count']}\nbgr {' '.join(f'{v:.6f}' for v in values['bgr'])}\n"
                    f"rgb {' '.join(f'{v:.6f}' for v in values['rgb'])}\n")
        write_atomic(values_out, text.encode())

