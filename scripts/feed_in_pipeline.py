"""The loader's feed while the whole pipeline runs: CPU time per record of the Python thread that hands
DALI its batches (records read by key, Datum parsed, the policy's draws), next to the process's CPU
time per record (DALI's threads included) and the rate.

    python scripts/feed_in_pipeline.py DB [--batch 256] [--threads 8] [--seconds 5] [--device gpu] [--policy caffe]

One Python thread runs the feed: 1 / (feed CPU per record) is the most records per second it can
hand over, to be set against the GPU's decode rate. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

from imgprep.loading import loader as loader_module
from imgprep.loading.bench import time_batches
from imgprep.loading.loader import Loader


class FeedClock:
    """Thread CPU seconds and records of every feed call made while it is installed."""

    def __init__(self):
        self.cpu, self.records, self.calls = 0.0, 0, 0
        self._call = loader_module._Feed.__call__

    def __enter__(self):
        clock, call = self, self._call

        def timed(feed):
            start = time.thread_time()
            batch = call(feed)
            clock.cpu += time.thread_time() - start
            clock.records += len(batch[0])
            clock.calls += 1
            return batch

        loader_module._Feed.__call__ = timed
        return self

    def __exit__(self, *exc):
        loader_module._Feed.__call__ = self._call


def measure(db, batch: int, threads: int, seconds: float, device: str, policy: str) -> dict:
    """The figures of one timed run after a warm-up of 3 batches."""
    with Loader(db, batch_size=batch, train=True, device=device, num_threads=threads, policy=policy,
                dtype="float16" if device == "gpu" else "float32") as loader, FeedClock() as clock:
        time_batches(loader.pipeline.run, batch, 0.0, 3)
        cpu0, records0, feed0, wall0 = time.process_time(), clock.records, clock.cpu, time.perf_counter()
        rate, ms, batches = time_batches(loader.pipeline.run, batch, seconds, 0)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        records, feed_cpu = clock.records - records0, clock.cpu - feed0
    return {"device": loader.device, "policy": policy, "batch": batch, "threads": threads, "batches": batches,
            "images_per_s": round(rate, 1), "records_fed": records,
            "feed_cpu_us_per_record": round(1e6 * feed_cpu / records, 2),
            "feed_ceiling_records_per_s": round(records / feed_cpu) if feed_cpu else None,
            "feed_share_of_one_core": round(feed_cpu / wall, 3),
            "process_cpu_us_per_record": round(1e6 * cpu / records, 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    parser.add_argument("--policy", default="caffe")
    args = parser.parse_args()
    print(json.dumps(measure(args.db, args.batch, args.threads, args.seconds, args.device, args.policy)))


if __name__ == "__main__":
    main()
