"""build-lmdb throughput vs what people use today, on the same ImageNet-like JPEGs, in one run.

    python benchmarks/bench_build.py [--images 2000] [--workdir build/bench]

Two tables, one per output spec, each against a single-process OpenCV loop doing what
convert_imageset does per image for that spec (imread, resize INTER_LINEAR, then BGR HWC -> CHW for
raw records or imencode for JPEG records, Datum, LMDB put, commit every 1000):
- Caffe's recipe, raw squash-256x256 records: the OpenCV loop, the same loop with Pillow, and
  imgprep build-lmdb at 1 job (with and without decode-time DCT scaling) and at all cores;
- the ResNet recipe, shorter-side-256 JPEG q90 records: the OpenCV loop and imgprep at 1 job and
  at all cores.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import lmdb
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import describe_jpegs, sample_tree, standard_args, table  # noqa: E402

from imgprep.build import BuildOptions, build_database  # noqa: E402
from imgprep.codec import encode_datum  # noqa: E402
from imgprep.imageops import ImageSpec, parse_resize  # noqa: E402
from imgprep.lists import read_list  # noqa: E402
from imgprep.parallel import resolve_jobs  # noqa: E402


def loop_build(entries, root: Path, out: Path, make_datum) -> float:
    shutil.rmtree(out, ignore_errors=True)
    env = lmdb.open(str(out), map_size=1 << 34)
    start = time.perf_counter()
    txn = env.begin(write=True)
    for i, (path, label) in enumerate(zip(entries.paths, entries.labels.tolist())):
        txn.put(f"{i:08d}_{path}".encode(), make_datum(str(root / path), label))
        if (i + 1) % 1000 == 0:
            txn.commit()
            txn = env.begin(write=True)
    txn.commit()
    env.close()
    return len(entries) / (time.perf_counter() - start)


def raw_datum(bgr_hwc, label) -> bytes:
    chw = np.ascontiguousarray(bgr_hwc.transpose(2, 0, 1))
    return encode_datum(chw.tobytes(), label, 3, chw.shape[1], chw.shape[2], False)


def opencv_squash_raw(path, label) -> bytes:
    import cv2

    return raw_datum(cv2.resize(cv2.imread(path, cv2.IMREAD_COLOR), (256, 256), interpolation=cv2.INTER_LINEAR),
                     label)


def pillow_squash_raw(path, label) -> bytes:
    with Image.open(path) as img:
        return raw_datum(np.asarray(img.convert("RGB").resize((256, 256), Image.BILINEAR))[:, :, ::-1], label)


def opencv_shorter_jpeg(path, label) -> bytes:
    import cv2

    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    h, w = bgr.shape[:2]
    scale = 256 / min(h, w)
    bgr = cv2.resize(bgr, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_LINEAR)
    _, jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return encode_datum(jpeg.tobytes(), label, 3, bgr.shape[0], bgr.shape[1], True)


def imgprep_build(list_file, root, out, spec, jobs) -> float:
    report = build_database(list_file, root, out, BuildOptions(spec=spec, jobs=jobs), overwrite=True,
                            show_progress=False)
    return report.records / report.seconds


def main():
    args = standard_args(__doc__, runs=(int, 3, "median of this many runs per row"))
    root, list_file = sample_tree(args.workdir, args.images)
    entries = read_list(list_file)
    cores = resolve_jobs(None)
    out = args.workdir / "db"
    caffe = ImageSpec(parse_resize("squash:256x256"), encoded=False)
    resnet = ImageSpec(parse_resize("shorter:256"), encoded=True, quality=90)
    try:
        import cv2  # noqa: F401
    except ImportError:
        sys.exit("bench_build compares against OpenCV: pip install '.[bench]'")

    def measure(make):
        return float(np.median([make() for _ in range(args.runs)]))

    imgprep_build(list_file, root, out, caffe, cores)  # warm the page cache and the worker pool
    opencv = "OpenCV loop, 1 process"  # what convert_imageset does per image
    caffe_rows = [
        (opencv, measure(lambda: loop_build(entries, root, out, opencv_squash_raw))),
        ("Pillow loop, 1 process", measure(lambda: loop_build(entries, root, out, pillow_squash_raw))),
        ("imgprep, 1 job", measure(lambda: imgprep_build(list_file, root, out, caffe, 1))),
        ("imgprep, 1 job, no DCT scaling",
         measure(lambda: imgprep_build(list_file, root, out, ImageSpec(caffe.resize, False, draft=False), 1))),
        (f"imgprep, {cores} jobs", measure(lambda: imgprep_build(list_file, root, out, caffe, cores))),
    ]
    resnet_rows = [
        (opencv, measure(lambda: loop_build(entries, root, out, opencv_shorter_jpeg))),
        ("imgprep, 1 job", measure(lambda: imgprep_build(list_file, root, out, resnet, 1))),
        (f"imgprep, {cores} jobs", measure(lambda: imgprep_build(list_file, root, out, resnet, cores))),
    ]
    print(f"build-lmdb, {describe_jpegs(root)}; {cores} cores, {os.uname().machine}, median of {args.runs} runs")
    print("\nCaffe's recipe: raw squash-256x256 records (--preset caffe)")
    print(table(caffe_rows, opencv))
    print("\nResNet recipe: shorter-side-256 JPEG q90 records (--preset resnet)")
    print(table(resnet_rows, opencv))


if __name__ == "__main__":
    main()
