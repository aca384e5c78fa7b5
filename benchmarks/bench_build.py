"""build-lmdb vs Caffe's own convert_imageset and an OpenCV loop, on the same ImageNet-like JPEGs,
in one run.

    IMGPREP_CAFFE_TOOLS=DIR python benchmarks/bench_build.py [--images 2000] [--runs 3]

Every row is a whole process as a user runs it (start-up included), the rows of a table timed
interleaved, one warm-up round first (page cache, compiled code). CPU is user + system seconds of
the process and every process it waited for (workers, writer), per image. Tables:
- Caffe's recipe, raw squash-256x256 records: `convert_imageset --resize_height 256 --resize_width
  256`, a single-process OpenCV loop doing what convert_imageset does per image (imread, resize
  INTER_LINEAR, BGR HWC -> CHW, Datum, LMDB put, commit every 1000), `imgprep build-lmdb --preset
  caffe` at 1 job and at all cores;
- JPEG records, against convert_imageset `--encoded` (squash-256 re-encoded as JPEG, OpenCV's
  default quality 95): `build-lmdb --resize squash:256x256 --encoded --quality 95`, and the ResNet
  recipe, shorter-side-256 JPEG q90 records (`--preset resnet`, which convert_imageset cannot make:
  its resize is a squash), beside the OpenCV loop doing the same.
Below the first table: the floor, decode + resize + BGR planes of every image in one process (no
Datum, no database), next to the builds' CPU per image.
Without IMGPREP_CAFFE_TOOLS, Caffe's rows are left out and the OpenCV loop is the baseline.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import caffe_tools, describe_jpegs, interleaved, sample_tree, standard_args, timing_table  # noqa: E402

from imgprep.formats.codec import encode_datum  # noqa: E402
from imgprep.formats.imageops import ImageSpec, process_image  # noqa: E402
from imgprep.formats.resizing import parse_resize
from imgprep.formats.lists import read_list  # noqa: E402
from imgprep.prepare.parallel import resolve_jobs  # noqa: E402

IMGPREP = [sys.executable, "-m", "imgprep"]
HERE = Path(__file__).resolve()


def loop_build(list_file: Path, root: Path, out: Path, recipe: str) -> None:
    """The OpenCV loop (run as its own process: `bench_build.py --loop RECIPE LIST ROOT OUT`)."""
    import cv2
    import lmdb
    import numpy as np

    entries = read_list(list_file)
    shutil.rmtree(out, ignore_errors=True)
    env = lmdb.open(str(out), map_size=1 << 34)
    txn = env.begin(write=True)
    for i, (path, label) in enumerate(zip(entries.paths, entries.labels.tolist())):
        bgr = cv2.imread(str(root / path), cv2.IMREAD_COLOR)
        if recipe == "squash-raw":
            chw = np.ascontiguousarray(cv2.resize(bgr, (256, 256), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1))
            value = encode_datum(chw.tobytes(), label, 3, 256, 256, False)
        else:  # shorter-jpeg
            h, w = bgr.shape[:2]
            scale = 256 / min(h, w)
            bgr = cv2.resize(bgr, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_LINEAR)
            value = encode_datum(cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes(), label,
                                 3, bgr.shape[0], bgr.shape[1], True)
        txn.put(f"{i:08d}_{path}".encode(), value)
        if (i + 1) % 1000 == 0:
            txn.commit()
            txn = env.begin(write=True)
    txn.commit()
    env.close()


def floor_ms(list_file: Path, root: Path, spec: ImageSpec) -> float:
    """Decode + resize + BGR planes per image in this process, no Datum or database: the work itself."""
    entries = read_list(list_file)
    files = [(root / p).read_bytes() for p in entries.paths]
    start = time.process_time()
    for data in files:
        process_image(data, spec)
    return 1000 * (time.process_time() - start) / len(files)


def main():
    if sys.argv[1:2] == ["--loop"]:
        recipe, list_file, root, out = sys.argv[2:6]
        return loop_build(Path(list_file), Path(root), Path(out), recipe)
    args = standard_args(__doc__, runs=(int, 3, "timed runs per row (after one warm-up round)"))
    root, list_file = sample_tree(args.workdir, args.images)
    n = len(read_list(list_file))
    cores = resolve_jobs(None)
    tools = caffe_tools()
    out = args.workdir / "db"
    try:
        import cv2  # noqa: F401
    except ImportError:
        sys.exit("bench_build compares against OpenCV: pip install '.[bench]'")

    def fresh(name):
        shutil.rmtree(out, ignore_errors=True)

    def imgprep(*options, jobs):
        return [*IMGPREP, "build-lmdb", list_file, root, out, *options, "--jobs", jobs, "--overwrite"]

    def loop(recipe):
        return [sys.executable, HERE, "--loop", recipe, list_file, root, out]

    def convert(*flags):
        return [tools / "convert_imageset", *flags, f"{root}/", list_file, out]

    caffe_name = "Caffe convert_imageset"
    squash = ["--resize_height=256", "--resize_width=256"]
    tables = []
    raw = {caffe_name: convert(*squash)} if tools else {}
    raw["OpenCV loop, 1 process"] = loop("squash-raw")
    for jobs in sorted({1, cores}):
        raw[f"imgprep --preset caffe, {jobs} job{'s' * (jobs > 1)}"] = imgprep("--preset", "caffe", jobs=jobs)
    tables.append(("Caffe's recipe: raw squash-256x256 records", raw))
    encoded = {caffe_name + " --encoded": convert(*squash, "--encoded")} if tools else {}
    for jobs in sorted({1, cores}):
        encoded[f"imgprep squash-256 --encoded --quality 95, {jobs} job{'s' * (jobs > 1)}"] = imgprep(
            "--resize", "squash:256x256", "--encoded", "--quality", "95", jobs=jobs)
    encoded["OpenCV loop shorter-256 q90, 1 process"] = loop("shorter-jpeg")
    for jobs in sorted({1, cores}):
        encoded[f"imgprep --preset resnet (shorter-256 q90), {jobs} job{'s' * (jobs > 1)}"] = imgprep(
            "--preset", "resnet", jobs=jobs)
    tables.append(("JPEG records: Caffe's --encoded (squash-256 q95) and the ResNet recipe (shorter-side-256 q90)",
                   encoded))

    print(f"build-lmdb, {describe_jpegs(root)}; {cores} cores, {os.uname().machine}; whole processes, "
          f"median of {args.runs} interleaved runs after a warm-up"
          + ("" if tools else "; Caffe's tools not at hand (set IMGPREP_CAFFE_TOOLS=DIR)"))
    for number, (title, commands) in enumerate(tables):
        timings = interleaved(commands, n, args.runs, prepare=fresh)
        print(f"\n{title}")
        print(timing_table(timings, next(iter(commands))))
        if number == 0:
            floor = floor_ms(list_file, root, ImageSpec(parse_resize("squash:256x256"), encoded=False))
            best = min(t.cpu_ms for name, t in timings.items() if name.startswith("imgprep"))
            print(f"\nfloor: decode + resize + BGR planes in one process {floor:.2f} ms of CPU per image; "
                  f"the imgprep builds above spend {best:.2f}-{max(t.cpu_ms for name, t in timings.items() if name.startswith('imgprep')):.2f} "
                  f"ms ({best - floor:+.2f} ms over the floor at best)")
            if tools:
                caffe, ours = timings[caffe_name], timings[f"imgprep --preset caffe, {cores} job{'s' * (cores > 1)}"]
                speed, cpu = ours.rate / caffe.rate, ours.cpu_ms / caffe.cpu_ms
                print(f"goal (all cores): at least 2.5x {caffe_name}'s rate, at most 0.7x its CPU per image: "
                      f"{speed:.2f}x, {cpu:.3f}x ({'met' if speed >= 2.5 and cpu <= 0.7 else 'not met'}); "
                      f"the floor alone is {floor / caffe.cpu_ms:.2f}x its CPU per image")


if __name__ == "__main__":
    main()
