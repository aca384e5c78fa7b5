"""build-lmdb throughput vs what people use today, on the same ImageNet-like JPEGs, in one run.

    python benchmarks/bench_build.py [--images 2000] [--workdir build/bench]

Rows, all producing raw squash-256x256 Datum records into LMDB (Caffe's recipe), and the
ResNet recipe (shorter-256 JPEG records) for imgprep:
- OpenCV loop: what convert_imageset does per image, single process (imread, resize
  INTER_LINEAR, BGR HWC -> CHW, Datum, LMDB put, commit every 1000);
- Pillow loop: the same with Pillow, single process;
- imgprep build-lmdb at 1 job and at all cores (with and without decode-time DCT scaling).
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
from common import sample_tree, standard_args, table  # noqa: E402

from imgprep.build import BuildOptions, build_database  # noqa: E402
from imgprep.codec import encode_datum  # noqa: E402
from imgprep.imageops import ImageSpec, parse_resize  # noqa: E402
from imgprep.lists import read_list  # noqa: E402
from imgprep.parallel import resolve_jobs  # noqa: E402


def loop_build(entries, root: Path, out: Path, read_resized) -> float:
    shutil.rmtree(out, ignore_errors=True)
    env = lmdb.open(str(out), map_size=1 << 34)
    start = time.perf_counter()
    txn = env.begin(write=True)
    for i, (path, label) in enumerate(zip(entries.paths, entries.labels.tolist())):
        bgr_hwc = read_resized(str(root / path))
        chw = np.ascontiguousarray(bgr_hwc.transpose(2, 0, 1))
        txn.put(f"{i:08d}_{path}".encode(), encode_datum(chw.tobytes(), label, 3, 256, 256, False))
        if (i + 1) % 1000 == 0:
            txn.commit()
            txn = env.begin(write=True)
    txn.commit()
    env.close()
    return len(entries) / (time.perf_counter() - start)


def opencv_read(path):
    import cv2

    return cv2.resize(cv2.imread(path, cv2.IMREAD_COLOR), (256, 256), interpolation=cv2.INTER_LINEAR)


def pillow_read(path):
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB").resize((256, 256), Image.BILINEAR))[:, :, ::-1]


def median_of(runs: int, measure) -> float:
    return float(np.median([measure() for _ in range(runs)]))


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
    runs = args.runs
    imgprep_build(list_file, root, out, caffe, cores)  # warm the page cache and the worker pool
    rows = []
    try:
        import cv2  # noqa: F401
        rows.append(("OpenCV loop (convert_imageset's work), 1 process",
                     median_of(runs, lambda: loop_build(entries, root, out, opencv_read))))
    except ImportError:
        print("opencv-python-headless is not installed (pip install '.[bench]'); OpenCV row skipped")
    rows.append(("Pillow loop, 1 process", median_of(runs, lambda: loop_build(entries, root, out, pillow_read))))
    rows.append(("imgprep caffe preset, 1 job", median_of(runs, lambda: imgprep_build(list_file, root, out, caffe, 1))))
    no_draft = ImageSpec(caffe.resize, False, draft=False)
    rows.append(("imgprep caffe preset, 1 job, no DCT scaling",
                 median_of(runs, lambda: imgprep_build(list_file, root, out, no_draft, 1))))
    rows.append((f"imgprep caffe preset, {cores} jobs",
                 median_of(runs, lambda: imgprep_build(list_file, root, out, caffe, cores))))
    rows.append((f"imgprep resnet preset (shorter-256 JPEG q90), {cores} jobs",
                 median_of(runs, lambda: imgprep_build(list_file, root, out, resnet, cores))))
    baseline = rows[0][0]
    print(f"build-lmdb, {len(entries)} ImageNet-like JPEGs, {cores} cores, {os.uname().machine}, "
          f"median of {runs} runs; records: raw squash-256 unless noted")
    print(table(rows, baseline))


if __name__ == "__main__":
    main()
