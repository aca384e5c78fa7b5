"""The loader's feed alone, per policy: CPU time per record, without decoding.

    python benchmarks/bench_feed.py [--images 2000] [--workdir build/bench] [--batch 256] [--rounds 5]

The feed is what DALI's `fn.external_source` calls on one Python thread per pipeline, once per
batch: the batch's keys from the epoch plan, one lookup per record, the Datum parsed, the policy's
per-sample draws (`policies.batch_params`; "inception" also reads every JPEG's size from its
header), the batch handed over as one DALI TensorList. Every policy is measured on the same LMDB
(`build-lmdb --preset resnet --shuffle` of the benchmark's ImageNet-sized JPEGs, read from the page
cache), as CPU time of the calling thread (`time.thread_time`) over whole batches, the policies
interleaved in each round; the table gives the median over the rounds and the range, against the
goal of 10 µs per record (one core feeding 100,000 images/s).

"first epoch": a fresh source reading every record once (parsing each Datum and JPEG header);
"later epochs": the same source again, which keeps what it learnt of each record (`records`);
"with DALI's intake": later epochs with DALI calling the feed, in a pipeline holding only the
`external_source` (the records' shapes its output), so it adds what DALI does with each batch on
that thread (taking it in, scheduling the run, handing out the outputs).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import describe_jpegs, sample_tree, standard_args  # noqa: E402

from imgprep.prepare.build import BuildOptions, build_database  # noqa: E402
from imgprep.formats.imageops import ImageSpec  # noqa: E402
from imgprep.formats.resizing import parse_resize
from imgprep.loading.loader import _Feed, _policy_params  # noqa: E402
from imgprep.loading.plan import EpochPlan  # noqa: E402
from imgprep.loading.policies import EVAL_POLICIES, TRAIN_POLICIES, policy  # noqa: E402
from imgprep.loading.records import RecordSource  # noqa: E402

GOAL_US = 10.0
MEAN = np.array([124.0, 116.0, 104.0])


def make_feed(source: RecordSource, name: str, batch: int, seed: int = 0) -> _Feed:
    """The loader's feed for policy `name` (one pipeline, as a GPU-only loader has)."""
    made = policy(name)
    plan = EpochPlan(len(source), batch, seed=seed, shuffle=made.train, mark_padding=not made.train)
    return _Feed(plan, source, _policy_params(made, seed, MEAN, "RGB", source), 0, lambda step: 0)


def cpu_us_per_record(feed: _Feed, records: int) -> float:
    """CPU µs of this thread per record over whole batches totalling at least `records`."""
    done, start = 0, time.thread_time()
    while done < records:
        done += len(feed()[0])
        feed.scheduled.clear()  # what the loader's run() pops
    return 1e6 * (time.thread_time() - start) / done


def through_dali(feed: _Feed, batch: int):
    """A pipeline whose only work is taking in the feed's batches: DALI's own cost on the feeding thread."""
    from nvidia.dali import fn, pipeline_def, types

    def source():
        out = feed()
        feed.scheduled.clear()
        return out

    values = source()[2:]  # the drawn values, however many inputs the feed hands them over in
    kinds = [types.INT32 if np.asarray(v).dtype == np.int32 else types.FLOAT for v in values]

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None, prefetch_queue_depth=2, exec_dynamic=False)
    def pipe():
        outputs = fn.external_source(source=source, num_outputs=2 + len(kinds), batch=True, no_copy=True,
                                     dtype=[types.UINT8, types.INT32] + kinds)
        return (outputs[0].shape(), *outputs[1:])

    built = pipe()
    built.build()
    return built


def dali_us_per_record(pipe, records: int) -> float:
    """CPU µs of this thread per record over pipeline runs totalling at least `records`."""
    done, start = 0, time.thread_time()
    while done < records:
        done += len(pipe.run()[1])
    return 1e6 * (time.thread_time() - start) / done


def first_epoch_us(db, name: str, batch: int) -> float:
    """CPU µs per record of one epoch from a fresh source: every record read for the first time."""
    source = RecordSource(db, "lmdb")
    try:
        return cpu_us_per_record(make_feed(source, name, batch), len(source))
    finally:
        source.close()


def main():
    args = standard_args(__doc__, batch=(int, 256, "records per batch"), rounds=(int, 5, "rounds; the median is shown"),
                         records=(int, 20000, "records fed per policy and round (later epochs)"))
    root, list_file = sample_tree(args.workdir, args.images)
    db = args.workdir / f"source_lmdb-{list_file.parent.name}"
    if not (db / "data.mdb").exists():
        build_database(list_file, root, db, BuildOptions(shuffle=True, spec=ImageSpec(parse_resize("shorter:256"), True)),
                       overwrite=True, show_progress=False)
    names = TRAIN_POLICIES + EVAL_POLICIES
    source = RecordSource(db, "lmdb")
    feeds = {name: make_feed(source, name, args.batch) for name in names}
    pipes = {name: through_dali(make_feed(source, name, args.batch), args.batch) for name in names}
    for name in names:  # warm-up: the page cache, the epoch's order
        first_epoch_us(db, name, args.batch)
        cpu_us_per_record(feeds[name], len(source))
        dali_us_per_record(pipes[name], len(source))
    first, later, dali = ({name: [] for name in names} for _ in range(3))
    for _ in range(args.rounds):
        for name in names:
            first[name].append(first_epoch_us(db, name, args.batch))
            later[name].append(cpu_us_per_record(feeds[name], args.records))
            dali[name].append(dali_us_per_record(pipes[name], args.records))
    print(f"{len(source):,} records ({describe_jpegs(root)}; stored shorter side 256, JPEG q90), "
          f"batch {args.batch}, median of {args.rounds} rounds; CPU µs per record of the feeding thread, "
          f"goal {GOAL_US:g}")
    print("| policy | first epoch | range | later epochs | range | x goal (first, later) | with DALI's intake | range |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")

    def cells(runs):
        return f"{statistics.median(runs):.2f} | {min(runs):.2f}-{max(runs):.2f}"

    for name in names:
        ratios = f"{statistics.median(first[name]) / GOAL_US:.2f}, {statistics.median(later[name]) / GOAL_US:.2f}"
        print(f"| {name} | {cells(first[name])} | {cells(later[name])} | {ratios} | {cells(dali[name])} |")
    for pipe in pipes.values():
        pipe._shutdown()
    source.close()


if __name__ == "__main__":
    main()
