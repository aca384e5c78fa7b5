"""compute-mean throughput vs a plain single-process loop over the records, raw and encoded.

    python benchmarks/bench_mean.py [--images 2000] [--workdir build/bench]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import sample_tree, standard_args, table  # noqa: E402

from imgprep.build import BuildOptions, build_database  # noqa: E402
from imgprep.codec import decode_datum  # noqa: E402
from imgprep.imageops import ImageSpec, decode_to_rgb, parse_resize  # noqa: E402
from imgprep.mean import compute_mean  # noqa: E402
from imgprep.parallel import resolve_jobs  # noqa: E402
from imgprep.storage import Reader  # noqa: E402


def plain_loop(db: Path) -> float:
    """What a careful user writes: decode each record (JPEG too), add it in place into a float64 sum."""
    start = time.perf_counter()
    total, n = None, 0
    with Reader(db) as reader:
        for _, value in reader.items():
            datum = decode_datum(value)
            if datum.encoded:
                pixels = decode_to_rgb(datum.data)[:, :, ::-1].transpose(2, 0, 1)
            else:
                pixels = np.frombuffer(datum.data, np.uint8).reshape(datum.channels, datum.height, datum.width)
            if total is None:
                total = np.zeros(pixels.shape, np.float64)
            total += pixels
            n += 1
    return n / (time.perf_counter() - start)


def main():
    args = standard_args(__doc__)
    root, list_file = sample_tree(args.workdir, args.images)
    cores = resolve_jobs(None)
    for kind, encoded in (("raw", False), ("encoded", True)):
        db = args.workdir / f"mean_{kind}-{list_file.parent.name}"  # one per sample tree
        if not (db / "data.mdb").exists():
            build_database(list_file, root, db, BuildOptions(spec=ImageSpec(parse_resize("squash:256x256"), encoded)),
                           overwrite=True, show_progress=False)
        rows = [("plain loop, 1 process", float(np.median([plain_loop(db) for _ in range(3)])))]
        for jobs in (1, cores):
            compute_mean(db, jobs=jobs, show_progress=False)  # warm-up: worker processes, page cache
            rates = []
            for _ in range(3):
                start = time.perf_counter()
                result = compute_mean(db, jobs=jobs, show_progress=False)
                rates.append(result.count / (time.perf_counter() - start))
            rows.append((f"imgprep compute-mean, {jobs} job(s)", float(np.median(rates))))
        print(f"\ncompute-mean, {kind} squash-256 records ({result.count} records, {cores} cores, median of 3 "
              "after a warm-up)")
        print(table(rows, rows[0][0]))


if __name__ == "__main__":
    main()
