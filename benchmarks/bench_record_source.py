"""The loader's record source alone: records/s it hands to DALI, without decoding.

    python benchmarks/bench_record_source.py [--images 2000] [--workdir build/bench] [--batch 256]

Rows: the source's callable (read by key in the epoch's shuffled order, Datum parsed, crops and
mirrors attached), and the same through a DALI pipeline holding only the `external_source` and the
records' shapes (what DALI receives per second, its own feeding work included; the decoder would
then read the bytes in place). The database is `build-lmdb --preset resnet
--shuffle` of the benchmark JPEGs, read from the page cache.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import sample_tree, standard_args, table  # noqa: E402

from imgprep.prepare.build import BuildOptions, build_database  # noqa: E402
from imgprep.formats.imageops import ImageSpec, parse_resize  # noqa: E402
from imgprep.loading.loader import _Feed, _policy_params  # noqa: E402
from imgprep.loading.policies import policy  # noqa: E402
from imgprep.formats.order import EpochPlan  # noqa: E402
from imgprep.loading.records import RecordSource  # noqa: E402


def rate(step, seconds: float) -> float:
    """Records per second of step() (which returns how many records it delivered)."""
    step()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        n += step()
    return n / (time.perf_counter() - start)


def caffe_feed(source: RecordSource, batch: int, seed: int, **kwargs) -> _Feed:
    """The loader's feed with the caffe policy's draws (crop x, crop y, mirror per sample)."""
    params = _policy_params(policy("caffe"), seed, (0.0, 0.0, 0.0), "RGB", source)
    return _Feed(EpochPlan(len(source), batch, seed=seed), source, params, 0, lambda step: 0, **kwargs)


def source_alone(source: RecordSource, batch: int, seed: int):
    feed = caffe_feed(source, batch, seed)
    return lambda: len(feed()[0])


def through_dali(source: RecordSource, batch: int, seed: int):
    from nvidia.dali import fn, pipeline_def, types

    feed = caffe_feed(source, batch, seed, keep=4)

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None)
    def pipe():
        data, label, crop_x, crop_y, mirror = fn.external_source(
            source=feed, num_outputs=5, batch=True, no_copy=True,
            dtype=[types.UINT8, types.INT32, types.FLOAT, types.FLOAT, types.INT32])
        # shapes, not the bytes: a decoder reads the records in place, copying them out would measure memcpy
        return fn.shapes(data), label, crop_x, crop_y, mirror

    p = pipe()
    p.build()
    return lambda: len(p.run()[1])


def main():
    args = standard_args(__doc__, batch=(int, 256, "records per batch"), seconds=(float, 3.0, "seconds per run"),
                         runs=(int, 3, "runs; the median is shown"))
    root, list_file = sample_tree(args.workdir, args.images)
    db = args.workdir / f"source_lmdb-{list_file.parent.name}"
    if not (db / "data.mdb").exists():
        build_database(list_file, root, db, BuildOptions(shuffle=True, spec=ImageSpec(parse_resize("shorter:256"), True)),
                       overwrite=True, show_progress=False)
    source = RecordSource(db, "lmdb")
    rows = []
    for name, make in (("record source (read by key, parse, crops)", source_alone),
                       ("record source through DALI's external_source", through_dali)):
        rates = [rate(make(source, args.batch, seed), args.seconds) for seed in range(args.runs)]
        rows.append((name, float(np.median(rates))))
        print(f"{name}: runs {', '.join(f'{r:,.0f}' for r in rates)} records/s", file=sys.stderr)
    source.close()
    print(f"{len(source):,} records, batch {args.batch}, median of {args.runs} runs of {args.seconds:g} s")
    print(table(rows, rows[0][0], unit="records/s"))


if __name__ == "__main__":
    main()
