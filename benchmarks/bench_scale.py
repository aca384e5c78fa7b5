"""Scale: list parsing and build-lmdb's peak memory as the list grows (1,000,000 lines; 100,000 records).

    python benchmarks/bench_scale.py [--workdir build/bench] [--records 100000]

Entries point at a pool of 50 small JPEGs through symlinks inside the root, so the build measures
imgprep's own bookkeeping, not image decoding.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from scale_fixtures import make_pool_tree, measure, write_long_list


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("build/bench"))
    parser.add_argument("--records", type=int, default=100_000)
    args = parser.parse_args()
    work = args.workdir / "scale"
    work.mkdir(parents=True, exist_ok=True)
    print("| what | entries | seconds | peak RSS (MB) | bytes per entry over the smallest |")
    print("|---|---:|---:|---:|---:|")
    base = None
    for lines in (100_000, 1_000_000):
        result = measure("parse", list=write_long_list(work / f"long{lines}.txt", lines))
        base = base or result
        extra = (result["peak_rss_mb"] - base["peak_rss_mb"]) * 2**20 / max(1, lines - base["n"])
        print(f"| parse list | {lines:,} | {result['seconds']:.2f} | {result['peak_rss_mb']:.0f} | "
              f"{extra:.0f} |" if lines != base["n"] else
              f"| parse list | {lines:,} | {result['seconds']:.2f} | {result['peak_rss_mb']:.0f} | - |")
    base = None
    for records in (args.records // 10, args.records):
        list_file = make_pool_tree(work / "tree", records)
        result = measure("build", list=list_file, root=work / "tree", out=work / "db", jobs=2)
        base = base or result
        extra = "-" if result is base else \
            f"{(result['peak_rss_mb'] - base['peak_rss_mb']) * 2**20 / (records - base['n']):.0f}"
        print(f"| build-lmdb (raw 16x16), writer process | {records:,} | {result['seconds']:.1f} | "
              f"{result['peak_rss_mb']:.0f} | {extra} |")


if __name__ == "__main__":
    main()
