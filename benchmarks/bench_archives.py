"""build-lmdb straight from the ILSVRC2012-style train tar vs unpacking it first, on the same images.

    python benchmarks/bench_archives.py [--images 2000] [--workdir build/bench] [--runs 3]

The same sample is a tree and the download's nested train tar (one tar per class). Rows, each a
median of --runs, run interleaved: indexing the tar (one pass over its headers, done once per
archive), build-lmdb from the tar, `tar -xf` of the outer and every class tar (what the usual
recipe does first), and build-lmdb from the unpacked tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import describe_jpegs, sample_tree, standard_args  # noqa: E402

from imgprep.prepare.archives import index_archive  # noqa: E402
from imgprep.prepare.build import BuildOptions, build_database  # noqa: E402
from imgprep.formats.imageops import ImageSpec  # noqa: E402
from imgprep.formats.resizing import parse_resize
from imgprep.prepare.download import TRAIN_TAR  # noqa: E402
from imgprep.prepare.parallel import resolve_jobs  # noqa: E402
from imgprep.prepare.sample import write_download  # noqa: E402
from imgprep.prepare.sources import open_source  # noqa: E402


def unpack(archive: Path, into: Path) -> float:
    """Seconds for what the usual recipe does: untar the outer tar, then each class tar into its folder."""
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    start = time.perf_counter()
    subprocess.run(["tar", "-xf", str(archive), "-C", str(into)], check=True)
    for inner in sorted(into.glob("*.tar")):
        folder = into / inner.name[:-4]
        folder.mkdir()
        subprocess.run(["tar", "-xf", str(inner), "-C", str(folder)], check=True)
        inner.unlink()
    os.sync()  # the files are on disk, as before a build reads them
    seconds = time.perf_counter() - start
    shutil.rmtree(into)
    return seconds


def read_all(paths: list[str], root: Path) -> float:
    """Seconds to read every listed image's bytes in one process (the I/O a build's workers do)."""
    source = open_source(root, show_progress=False)
    start = time.perf_counter()
    for rel in paths:
        source.read(rel)
    return time.perf_counter() - start


def build(list_file: Path, root: Path, out: Path, jobs: int) -> float:
    spec = ImageSpec(parse_resize("shorter:256"), encoded=True, quality=90)
    start = time.perf_counter()
    build_database(list_file, root, out, BuildOptions(spec=spec, shuffle=True, jobs=jobs), overwrite=True,
                   show_progress=False)
    return time.perf_counter() - start


def main():
    args = standard_args(__doc__, runs=(int, 3, "measured runs per row (after a warm-up)"))
    os.environ["XDG_CACHE_HOME"] = str(args.workdir / "cache")  # the benchmark's own index
    root, list_file = sample_tree(args.workdir, args.images)
    download = args.workdir / f"download-{root.parent.name}"
    if not (download / TRAIN_TAR).exists():
        write_download(root.parent, download)
    archive = download / TRAIN_TAR
    jobs = resolve_jobs(None)
    paths = [line.rsplit(" ", 1)[0] for line in list_file.read_text().splitlines()]
    count = len(paths)
    build(list_file, archive, args.workdir / "archive_db", jobs)  # warm-up; makes the index
    times: dict[str, list[float]] = {"index": [], "tar": [], "unpack": [], "tree": [], "read tar": [], "read tree": []}
    for _ in range(args.runs):
        start = time.perf_counter()
        index_archive(archive, show_progress=False)
        times["index"].append(time.perf_counter() - start)
        times["tar"].append(build(list_file, archive, args.workdir / "archive_db", jobs))
        times["unpack"].append(unpack(archive, args.workdir / "unpacked"))
        times["tree"].append(build(list_file, root, args.workdir / "archive_tree_db", jobs))
        times["read tar"].append(read_all(paths, archive))
        times["read tree"].append(read_all(paths, root))
    t = {name: float(np.median(values)) for name, values in times.items()}
    spread = {name: f"{min(v):.3f}-{max(v):.3f}" for name, v in times.items()}
    rows = [("index the train tar (one pass over its headers, once per archive)", t["index"], spread["index"]),
            ("read every image's bytes from the train tar, 1 process", t["read tar"], spread["read tar"]),
            ("read every image's bytes from the unpacked tree, 1 process", t["read tree"], spread["read tree"]),
            ("build-lmdb from the train tar", t["tar"], spread["tar"]),
            ("unpack: tar -xf the train tar, then every class tar", t["unpack"], spread["unpack"]),
            ("build-lmdb from the unpacked tree", t["tree"], spread["tree"]),
            ("from the download, straight from the tar: index + build", t["index"] + t["tar"], ""),
            ("from the download, the usual way: unpack + build", t["unpack"] + t["tree"], "")]
    print(f"\nbuild-lmdb --preset resnet --shuffle, {jobs} jobs, on {describe_jpegs(root)} "
          f"({archive.stat().st_size / 2**20:,.0f} MiB train tar), median of {args.runs} runs after a warm-up")
    print("| step | seconds | range | img/s |")
    print("|---|---:|---:|---:|")
    for name, seconds, rng in rows:
        print(f"| {name} | {seconds:.3f} | {rng} | {count / seconds:,.0f} |")
    print(f"\nbuild from the tar / from the tree: {t['tree'] / t['tar']:.2f}x the speed; the whole way from the "
          f"download: {(t['unpack'] + t['tree']) / (t['index'] + t['tar']):.2f}x faster without unpacking, which "
          f"would also have written {count:,} files")


if __name__ == "__main__":
    main()
