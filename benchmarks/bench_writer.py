"""The database writer alone: ready Datum records in, records/s and CPU per record out.

    python benchmarks/bench_writer.py --raw 2000 --jpeg 20000 --rounds 5

No decoding: each run makes its records first (3x256x256 raw Datums, 196 KB, and 256x256 q95 JPEG
Datums, about 25 KB, from the bundled photos), then times opening the writer, one `put_batch` per
`--txn-size` records in key order, as a build hands them over, and `close()`. CPU is the user +
system time of the process over that span (`getrusage`), which a busy machine changes far less
than the wall time; "writer thread" is the part of it spent in the thread that calls the writer
(LMDB's in-place writer writes back from a second thread meanwhile). Every run is a fresh
process writing a fresh database under --workdir; the rows take turns within each round, and the
table gives medians and ranges over the rounds.

Page cache: the time to store a record into the page cache depends on whether the kernel hands out
memory it just freed or memory that has been idle. On a VM whose memory balloon reports freed pages
to the host (free page reporting), idle memory is taken back and must be faulted in and zeroed
anew, 10-20x dearer per page; a build that keeps writing soon reuses what it freed. `--page-cache
recycled` first stores as many bytes as the run will write (plus half) through a map of a scratch
file and deletes it, so the timed writes find just-freed memory; `as-is` does not; `both` (the
default) gives each row in both.

Rows: the writer imgprep uses (`imgprep.formats.storage.open_writer`), next to plain writers configured by
--variant, whose defaults are the writers imgprep used before: LMDB opened with a 1 GiB map that
doubles when full, every commit synced; LevelDB with every write batch synced. A variant is
`NAME=BACKEND:OPTION=VALUE,...`: lmdb.open's options for an LMDB (map_size, writemap, sync,
metasync, map_async, meminit), `sync` for a LevelDB's write batches; a writer whose commits are not
synced syncs once when it closes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))

KINDS = {"raw": "raw 3x256x256 Datums (196 KB)", "jpeg": "JPEG q95 256x256 Datums"}
PREVIOUS = {"previous imgprep writer, LMDB": "lmdb:map_size=1073741824,meminit=0",
            "previous imgprep writer, LevelDB": "leveldb:sync=1"}


def make_records(kind: str, count: int) -> list[tuple[bytes, bytes]]:
    """`count` (key, Datum) pairs in key order, as a build makes them, from 32 distinct images."""
    import numpy as np
    from PIL import Image

    from imgprep.formats.codec import encode_datum
    from imgprep.prepare.sample import photo_paths

    rng = random.Random(0)
    values = []
    photos = [Image.open(p).convert("RGB") for p in photo_paths()]
    for i in range(32):
        photo = photos[i % len(photos)]
        side = rng.randint(min(photo.size) // 2, min(photo.size))
        x, y = rng.randint(0, photo.width - side), rng.randint(0, photo.height - side)
        image = photo.crop((x, y, x + side, y + side)).resize((256, 256), Image.BILINEAR)
        if kind == "raw":
            planes = np.ascontiguousarray(np.asarray(image)[:, :, ::-1].transpose(2, 0, 1))
            values.append(encode_datum(planes.tobytes(), i % 1000, 3, 256, 256, False))
        else:
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=95)
            values.append(encode_datum(buffer.getvalue(), i % 1000, 0, 0, 0, True))
    return [(f"{i:08d}_n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG".encode(), values[i % 32]) for i in range(count)]


class PlainLmdb:
    """An LMDB writer configured by lmdb.open's options: one transaction per batch (MDB_APPEND),
    the map doubled whenever it is full; synced once at close when its commits are not."""

    def __init__(self, path: Path, options: dict):
        import lmdb

        self.lmdb = lmdb
        options = {"map_size": 1 << 30, **options}
        self.env = lmdb.open(str(path), subdir=True, max_dbs=0, **options)
        self.sync_at_close = not options.get("sync", True)

    def put_batch(self, items):
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    with txn.cursor() as cursor:
                        cursor.putmulti(items, append=True)
                return
            except self.lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)

    def close(self):
        if self.sync_at_close:
            self.env.sync(True)
        self.env.close()


class PlainLevelDB:
    """A LevelDB writer with Caffe's options, one write batch per batch, synced or not; one synced
    (empty) batch at close when the others are not."""

    def __init__(self, path: Path, options: dict):
        import plyvel

        from imgprep.formats.storage import LEVELDB_OPTIONS

        self.db = plyvel.DB(str(path), create_if_missing=True, **LEVELDB_OPTIONS)
        self.sync = bool(options.get("sync", True))

    def put_batch(self, items):
        with self.db.write_batch(sync=self.sync) as batch:
            for key, value in items:
                batch.put(key, value)

    def close(self):
        if not self.sync:
            with self.db.write_batch(sync=True):
                pass
        self.db.close()


def parse_variant(text: str) -> tuple[str, dict]:
    backend, _, rest = text.partition(":")
    if backend not in ("lmdb", "leveldb"):
        raise SystemExit(f"variant {text!r}: the backend is lmdb or leveldb")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        options[key] = int(value) if key == "map_size" else bool(int(value))
    return backend, options


def recycle_page_cache(folder: Path, size: int) -> None:
    """Stores `size` bytes through a writable map of a scratch file in `folder`, then deletes it: the
    page cache's next pages are memory just freed."""
    import mmap

    step = 1 << 20
    size = -(-size // step) * step
    scratch = folder / "bench_writer_recycle.tmp"
    try:
        with open(scratch, "w+b") as f:
            os.posix_fallocate(f.fileno(), 0, size)  # a full disk is an error here, not SIGBUS in the loop
            with mmap.mmap(f.fileno(), size) as view:
                block = b"\1" * step
                for offset in range(0, size, step):
                    view[offset:offset + step] = block
    finally:
        scratch.unlink(missing_ok=True)


def child(spec: dict) -> dict:
    """One timed run in this process: make the records, then open, put every batch, close."""
    from imgprep.formats.storage import open_writer

    items = make_records(spec["kind"], spec["records"])
    batches = [items[i:i + spec["txn_size"]] for i in range(0, len(items), spec["txn_size"])]
    path = Path(spec["path"])
    if spec["recycle"]:
        recycle_page_cache(path.parent, sum(len(v) for _, v in items) * 3 // 2)
    before, start, thread = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), time.thread_time()
    if spec["variant"] is None:
        writer = open_writer(path, spec["backend"])
    else:
        backend, options = parse_variant(spec["variant"])
        writer = (PlainLmdb if backend == "lmdb" else PlainLevelDB)(path, options)
    for batch in batches:
        writer.put_batch(batch)
    writer.close()
    wall, thread = time.perf_counter() - start, time.thread_time() - thread
    after = resource.getrusage(resource.RUSAGE_SELF)
    size = sum(f.stat().st_size for f in path.iterdir())
    return {"wall": wall, "thread": thread, "user": after.ru_utime - before.ru_utime,
            "sys": after.ru_stime - before.ru_stime, "bytes": size,
            "faults": after.ru_minflt + after.ru_majflt - before.ru_minflt - before.ru_majflt}


def run_child(spec: dict) -> dict:
    path = Path(spec["path"])
    shutil.rmtree(path, ignore_errors=True)
    try:
        result = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                text=True)
        if result.returncode:
            raise SystemExit(f"run {spec} failed:\n{result.stderr[-3000:]}")
        return json.loads(result.stdout)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def spread(values: list[float], scale: float, digits: int) -> tuple[str, str]:
    values = [v * scale for v in values]
    return f"{statistics.median(values):,.{digits}f}", f"{min(values):,.{digits}f}-{max(values):,.{digits}f}"


def table(rows: dict, count: int) -> str:
    lines = ["| writer | records/s (median) | range | CPU ms per record (median) | range | user ms | system ms "
             "| writer thread ms | page faults per record | MB on disk |", "|---|" + "---:|" * 9]
    for name, runs in rows.items():
        rate, rate_range = spread([count / r["wall"] for r in runs], 1, 0)
        cpu, cpu_range = spread([r["user"] + r["sys"] for r in runs], 1000 / count, 3)
        user, _ = spread([r["user"] for r in runs], 1000 / count, 3)
        system, _ = spread([r["sys"] for r in runs], 1000 / count, 3)
        thread, _ = spread([r["thread"] for r in runs], 1000 / count, 3)
        faults, _ = spread([r["faults"] for r in runs], 1 / count, 1)
        size, _ = spread([r["bytes"] for r in runs], 1e-6, 0)
        lines.append(f"| {name} | {rate} | {rate_range} | {cpu} | {cpu_range} | {user} | {system} | {thread} "
                     f"| {faults} | {size} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=int, default=2000, help="raw records per run (0: none)")
    parser.add_argument("--jpeg", type=int, default=20000, help="JPEG records per run (0: none)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--txn-size", type=int, default=1000, help="records per put_batch (build-lmdb's default)")
    parser.add_argument("--backends", default="lmdb,leveldb")
    parser.add_argument("--variant", action="append", default=None, metavar="NAME=BACKEND:OPTIONS",
                        help="a plain writer to compare (repeatable); default: the previous imgprep writers")
    parser.add_argument("--page-cache", choices=("as-is", "recycled", "both"), default="both",
                        help="time each row with the page cache as it is, after recycling memory, or both")
    parser.add_argument("--workdir", type=Path, default=Path("build/bench"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    backends = args.backends.split(",")
    variants = dict(v.split("=", 1) for v in args.variant) if args.variant else PREVIOUS
    args.workdir.mkdir(parents=True, exist_ok=True)
    regimes = {"as-is": [False], "recycled": [True], "both": [False, True]}[args.page_cache]
    print(f"{os.cpu_count()} CPUs; {args.rounds} rounds; one put_batch per {args.txn_size} records; "
          f"databases under {args.workdir.resolve()}")
    for kind, count in (("raw", args.raw), ("jpeg", args.jpeg)):
        if not count:
            continue
        for backend in backends:
            configs = {f"imgprep writer, {'LMDB' if backend == 'lmdb' else 'LevelDB'}": None}
            configs.update({name: text for name, text in variants.items() if text.startswith(backend + ":")})
            configs = {(f"{name}, page cache recycled" if recycle else name): (variant, recycle)
                       for name, variant in configs.items() for recycle in regimes}
            rows = {name: [] for name in configs}
            for _ in range(args.rounds):
                for name, (variant, recycle) in configs.items():
                    spec = {"kind": kind, "records": count, "txn_size": args.txn_size, "backend": backend,
                            "variant": variant, "recycle": recycle, "path": str(args.workdir / "bench_writer_db")}
                    rows[name].append(run_child(spec))
            print(f"\n{backend}, {count:,} {KINDS[kind]}")
            print(table(rows, count))


if __name__ == "__main__":
    main()
