"""compute-mean vs Caffe's own compute_image_mean, raw and encoded records, in one run.

    IMGPREP_CAFFE_TOOLS=DIR python benchmarks/bench_mean.py [--images 2000] [--records 2500,50000]

Every row is a whole process as a user runs it (start-up included), timed interleaved with the
others: `compute_image_mean DB OUT` and `imgprep compute-mean DB OUT --jobs 1 | 2`, page cache warm.
Raw squash-256 LMDBs of each size in --records are the benchmark JPEGs' records repeated under new
keys; the encoded one holds the JPEGs once. With --cold, the raw databases are also read with their
file evicted from the page cache first (posix_fadvise), beside the disk's sequential read rate.
Without IMGPREP_CAFFE_TOOLS, Caffe's rows are left out (the first imgprep row is the baseline).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import caffe_tools, interleaved, sample_tree, standard_args, timing_table  # noqa: E402

from imgprep.prepare.build import BuildOptions, build_database  # noqa: E402
from imgprep.formats.imageops import ImageSpec  # noqa: E402
from imgprep.formats.resizing import parse_resize
from imgprep.prepare.parallel import resolve_jobs  # noqa: E402
from imgprep.formats.storage import Reader, open_writer  # noqa: E402

IMGPREP = [sys.executable, "-m", "imgprep"]


def repeated_db(source: Path, out: Path, records: int) -> Path:
    """An LMDB of `records` records cycling through `source`'s, keyed %08d_ like a build."""
    if (out / "data.mdb").exists():
        with Reader(out) as reader:
            if len(reader) == records:
                return out
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    with Reader(source) as reader:
        values = [value for _, value in reader.items()]
    writer = open_writer(out, "lmdb")
    for start in range(0, records, 1000):
        writer.put_batch([(f"{i:08d}_r{i}".encode(), values[i % len(values)])
                          for i in range(start, min(records, start + 1000))])
    writer.close()
    return out


def evict(db: Path) -> None:
    """Drops the database file's pages from the page cache (clean pages only, as after a reboot)."""
    fd = os.open(db / "data.mdb", os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def sequential_read_rate(db: Path) -> float:
    """MB/s of reading the database file start to end in 8 MiB blocks, cache evicted first."""
    evict(db)
    path = db / "data.mdb"
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(8 << 20):
            pass
    return path.stat().st_size / (time.perf_counter() - start) / 1e6


def mean_commands(db: Path, out: Path, tools: Path | None, cores: int) -> dict:
    commands = {}
    if tools:
        commands["Caffe compute_image_mean"] = [tools / "compute_image_mean", "--backend=lmdb", db, out / "caffe.binaryproto"]
    for jobs in sorted({1, cores}):
        commands[f"imgprep compute-mean, {jobs} job{'s' * (jobs > 1)}"] = [
            *IMGPREP, "compute-mean", db, out / f"ours{jobs}.binaryproto", "--jobs", jobs, "--overwrite"]
    return commands


def main():
    args = standard_args(__doc__, runs=(int, 5, "timed runs per row (after one warm-up)"),
                         records=(str, "2500,50000", "sizes of the raw databases, comma-separated"),
                         cold=(int, 0, "also time the raw databases read cold (1) or not (0)"))
    root, list_file = sample_tree(args.workdir, args.images)
    cores = resolve_jobs(None)
    tools = caffe_tools()
    spec = parse_resize("squash:256x256")
    base = {}
    for kind, encoded in (("raw", False), ("encoded", True)):
        db = base[kind] = args.workdir / f"mean_{kind}-{list_file.parent.name}"  # one per sample tree
        if not (db / "data.mdb").exists():
            build_database(list_file, root, db, BuildOptions(spec=ImageSpec(spec, encoded), shuffle=True),
                           overwrite=True, show_progress=False)
    print(f"compute-mean, squash-256 records of the benchmark JPEGs; {cores} cores, {os.uname().machine}; "
          f"whole processes, median of {args.runs} interleaved runs after a warm-up"
          + ("" if tools else "; Caffe's tools not at hand (set IMGPREP_CAFFE_TOOLS=DIR)"))
    cases = [(f"raw, {int(n):,} records", repeated_db(base["raw"], args.workdir / f"mean_raw{int(n)}", int(n)), int(n))
             for n in args.records.split(",")]
    with Reader(base["encoded"]) as reader:
        cases.append((f"encoded (JPEG q90), {len(reader):,} records", base["encoded"], len(reader)))
    for title, db, n in cases:
        commands = mean_commands(db, args.workdir, tools, cores)
        timings = interleaved(commands, n, args.runs)
        print(f"\n{title}, page cache warm")
        print(timing_table(timings, next(iter(commands)), "records/s"))
        if tools:
            ours = timings[f"imgprep compute-mean, {cores} job{'s' * (cores > 1)}"].rate
            ratio = ours / timings["Caffe compute_image_mean"].rate
            print(f"goal (all cores): at least 1.8x compute_image_mean's rate: {ratio:.2f}x "
                  f"({'met' if ratio >= 1.8 else 'not met'})")
    if args.cold:
        for title, db, n in cases[:-1]:
            commands = mean_commands(db, args.workdir, tools, cores)
            timings = interleaved(commands, n, max(1, args.runs // 2), prepare=lambda name, db=db: evict(db),
                                  warmup=False)
            size = (db / "data.mdb").stat().st_size
            print(f"\n{title}, read cold ({size / 1e9:.1f} GB file evicted from the page cache before each run); "
                  f"the disk reads it sequentially at {sequential_read_rate(db):,.0f} MB/s")
            print(timing_table(timings, next(iter(commands)), "records/s"))


if __name__ == "__main__":
    main()
