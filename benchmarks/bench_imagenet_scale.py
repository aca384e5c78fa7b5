"""build-lmdb at ImageNet's count: 1,281,167 tiny JPEGs straight from a synthetic train tar, in one run.

    python benchmarks/bench_imagenet_scale.py [--members 1281167] [--rounds 3] [--workdir build/bench]

The tar is shaped like ILSVRC2012_img_train.tar (1,000 class tars inside one tar; see imagenet_tar.py)
and made once (about a minute); its members are ~1 KB 16x16 JPEGs, so decoding costs little and
the figures are imgprep's own work per record: the list, the shuffled order, the archive lookup
and read, opening and checking each JPEG (kept as it is: no --resize), the hand-back from the
workers and the writer. Every row is a whole process (`imgprep build-lmdb LIST TAR OUT --shuffle`),
CPU counted over it and every process it waited for, the rows taking turns within each round:
- indexing the archive, once (the index is cached: later commands map it);
- one build at --jobs 1 and at the default (every core);
- four shards (`--num-shards 4 --shard-index K`, one after another), their CPU added up, against
  one build's.
Goals: at most 120 µs of CPU per record in all processes, and four shards at most 5% more CPU
than one build.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import run_process  # noqa: E402
from imagenet_tar import IMAGENET_TRAIN, make_train_tar  # noqa: E402

IMGPREP = [sys.executable, "-m", "imgprep"]
SHARDS = 4


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):,.1f} ({min(values):,.1f}-{max(values):,.1f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=IMAGENET_TRAIN, help="JPEGs in the synthetic tar")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (every row once per round)")
    parser.add_argument("--workdir", type=Path, default=Path("build/bench"))
    args = parser.parse_args()
    work = args.workdir / "imagenet_scale"
    tar, list_file, made = make_train_tar(work, args.members)
    n = args.members
    cache = work / "cache"
    env = dict(os.environ, XDG_CACHE_HOME=str(cache))
    out = work / "db"

    def build(*options):
        return [*IMGPREP, "build-lmdb", list_file, tar, out, "--shuffle", "--overwrite", *options]

    shutil.rmtree(cache, ignore_errors=True)
    start = time.perf_counter()
    index_wall, index_cpu = run_process([sys.executable, "-c", "import sys; from imgprep.prepare.archives import "
                                         "TarSource; TarSource.open(sys.argv[1], show_progress=False)", tar], env)
    rows = {"one build, --jobs 1": [build("--jobs", "1")], "one build, default --jobs": [build()],
            f"{SHARDS} shards, default --jobs": [build("--num-shards", SHARDS, "--shard-index", k)
                                                 for k in range(SHARDS)]}
    walls = {name: [] for name in rows}
    cpus = {name: [] for name in rows}
    for _ in range(args.rounds):
        for name, commands in rows.items():
            wall = cpu = 0.0
            for command in commands:
                shutil.rmtree(out, ignore_errors=True)
                w, c = run_process(command, env)
                wall, cpu = wall + w, cpu + c
            walls[name].append(wall)
            cpus[name].append(cpu)
    shutil.rmtree(out, ignore_errors=True)
    print(f"build-lmdb --shuffle of {n:,} ~1 KB 16x16 JPEGs from a synthetic train tar of 1,000 class tars "
          f"({tar.stat().st_size / 1e9:.1f} GB{f', made in {made:.0f} s' if made else ''}); {os.cpu_count()} cores; "
          f"whole processes, median (range) of {args.rounds} rounds; the archive indexed once in "
          f"{index_wall:.1f} s, {1e6 * index_cpu / n:.1f} µs of CPU per member")
    print("\n| what | seconds | records/s | CPU µs per record | CPU x one build (default --jobs) |")
    print("|---|---:|---:|---:|---:|")
    base = statistics.median(cpus["one build, default --jobs"])
    for name in rows:
        per_record = [1e6 * c / n for c in cpus[name]]
        print(f"| {name} | {spread(walls[name])} | {n / statistics.median(walls[name]):,.0f} | {spread(per_record)} | "
              f"{statistics.median(cpus[name]) / base:.3f} |")
    print(f"\n(whole run {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
