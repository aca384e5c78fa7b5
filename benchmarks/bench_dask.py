"""build-lmdb and compute-mean through a Dask LocalCluster (2 worker processes, loopback) vs local
(loky) processes, on the same images, in one run. Expect parity on one machine: the point is that
the Dask path is the one that scales to a real cluster.

    python benchmarks/bench_dask.py [--images 2000] [--workdir build/bench]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import describe_jpegs, sample_tree, standard_args, table  # noqa: E402

from imgprep.prepare.build import BuildOptions, build_database  # noqa: E402
from imgprep.formats.imageops import ImageSpec  # noqa: E402
from imgprep.formats.resizing import parse_resize
from imgprep.prepare.mean import MeanTransform, compute_mean  # noqa: E402
from imgprep.prepare.parallel import resolve_jobs  # noqa: E402


def main():
    args = standard_args(__doc__)
    root, list_file = sample_tree(args.workdir, args.images)
    from distributed import LocalCluster

    cores = resolve_jobs(None)
    spec = ImageSpec(parse_resize("shorter:256"), encoded=True)
    with LocalCluster(n_workers=cores, threads_per_worker=1, host="127.0.0.1", dashboard_address=None,
                      silence_logs=40) as cluster:
        build_rows, mean_rows = [], []
        for name, kwargs in ((f"local processes, {cores}", {"jobs": cores}),
                             (f"Dask LocalCluster, {cores} workers", {"scheduler": cluster.scheduler_address})):
            out = args.workdir / "dask_bench_db"
            rates = []
            for _ in range(2):  # the first run also starts workers and warms the page cache
                report = build_database(list_file, root, out, BuildOptions(spec=spec, **kwargs), overwrite=True,
                                        show_progress=False)
                rates.append(report.records / report.seconds)
            build_rows.append((name, rates[-1]))
            start = time.perf_counter()
            result = compute_mean(out, MeanTransform(crop=224), show_progress=False, **kwargs)
            mean_rows.append((name, result.count / (time.perf_counter() - start)))
    print(f"build-lmdb, {describe_jpegs(root)} -> shorter-256 JPEG records")
    print(table(build_rows, build_rows[0][0]))
    print("\ncompute-mean --crop 224 of that database")
    print(table(mean_rows, mean_rows[0][0]))

if __name__ == "__main__":
    main()
