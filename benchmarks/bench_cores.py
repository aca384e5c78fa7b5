"""build-lmdb on many cores: where the single writer stops the scaling, measured.

    python benchmarks/bench_cores.py [--images 2000 | --list LIST --root ROOT] [--jobs 1,2,4,8,16]
                                     [--shards 2,4,8] [--preset caffe]

For each --jobs: images/s of one build and the writer's share of its core (CPU seconds of the
writer process, which also hands out the work, over the build's wall time; near 100% it is the
ceiling). For each --shards K: K builds of `--num-shards K` run at once (all cores split between
them), then `merge`; images/s of the parts alone and with the merge.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import sample_tree, standard_args  # noqa: E402

from imgprep.prepare.build import BuildOptions, build_database, image_spec  # noqa: E402
from imgprep.formats.imageops import ImageSpec  # noqa: E402
from imgprep.formats.lists import read_list  # noqa: E402
from imgprep.prepare.parallel import resolve_jobs  # noqa: E402

IMGPREP = [sys.executable, "-m", "imgprep"]


def one_build(list_file, root, out, spec: ImageSpec, jobs) -> tuple[float, float]:
    """(images/s, the writer process's CPU share of one core) of a build in this process."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    report = build_database(list_file, root, out, BuildOptions(jobs=jobs, spec=spec), overwrite=True,
                            show_progress=False)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return report.records / report.seconds, cpu / report.seconds


def sharded_build(list_file, root, out: Path, preset_name, shards, cores) -> tuple[float, float]:
    """(images/s of the K parts built at once, images/s including the merge)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    jobs = max(1, cores // shards)
    start = time.perf_counter()
    procs = [subprocess.Popen([*IMGPREP, "build-lmdb", str(list_file), str(root), str(out / f"part{i}"),
                               "--preset", preset_name, "--num-shards", str(shards), "--shard-index", str(i),
                               "--jobs", str(jobs)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for i in range(shards)]
    if any(p.wait() for p in procs):
        raise SystemExit("a shard build failed")
    parts = time.perf_counter() - start
    subprocess.run([*IMGPREP, "merge", *[str(out / f"part{i}") for i in range(shards)], str(out / "merged")],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    total = time.perf_counter() - start
    n = len(read_list(list_file))
    return n / parts, n / total


def main():
    args = standard_args(__doc__, jobs=(str, "1,2,4,8,16", "job counts to build with, comma-separated"),
                         shards=(str, "2,4,8", "shard counts for --num-shards + merge, comma-separated"),
                         preset=(str, "caffe", "build-lmdb preset"),
                         list=(Path, None, "an image list (default: the benchmark sample's)"),
                         root=(Path, None, "its image root"))
    if args.list:
        list_file, root = args.list, args.root
    else:
        root, list_file = sample_tree(args.workdir, args.images)
    cores = resolve_jobs(None)
    name = args.preset
    preset = image_spec(name)
    out = args.workdir / "cores_db"
    one_build(list_file, root, out, preset, min(2, cores))  # warm-up: page cache, worker start
    print(f"build-lmdb --preset {name}, {len(read_list(list_file)):,} images; {cores} cores, {os.uname().machine}")
    print("\n| jobs | img/s | writer's share of its core |\n|---:|---:|---:|")
    for jobs in map(int, args.jobs.split(",")):
        rate, share = one_build(list_file, root, out, preset, jobs)
        print(f"| {jobs} | {rate:,.0f} | {100 * share:.0f}% |", flush=True)
    print("\n| shards built at once (cores split) + merge | img/s, parts | img/s, with the merge |\n|---|---:|---:|")
    for shards in map(int, args.shards.split(",")):
        parts, total = sharded_build(list_file, root, args.workdir / "cores_shards", name, shards, cores)
        print(f"| {shards} x {max(1, cores // shards)} jobs | {parts:,.0f} | {total:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
