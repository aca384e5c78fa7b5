"""Ordered, bounded parallel map over chunks of work: local processes (joblib's loky executor) or
a Dask cluster.

At most `2 x workers` chunks are outstanding (running, or done and waiting for the consumer); the
next chunk is submitted only when the consumer takes a result. So a consumer slower than the
workers (a writer on a slow disk) holds the workers back instead of letting results pile up in
memory. (joblib's `Parallel(return_as="generator")` keeps dispatching as tasks finish, whatever
the consumer does, so it is not used here.)
"""

from __future__ import annotations

import itertools
import os
from collections import deque

from . import ImgprepError

WINDOW_PER_WORKER = 2


def resolve_jobs(jobs: int | None) -> int:
    """`None` or <= 0 means every core this process may use."""
    if jobs and jobs > 0:
        return jobs
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def chunked(iterable, size: int):
    it = iter(iterable)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def dask_client(scheduler: str):
    try:
        from dask.distributed import Client
    except ImportError:
        raise ImgprepError("--scheduler needs the dask extra: pip install 'imgprep[dask]'") from None
    try:
        return Client(scheduler, timeout="10s")
    except (OSError, TimeoutError) as e:
        raise ImgprepError(f"cannot reach the Dask scheduler at {scheduler}: {e}") from None


def _windowed(submit, chunks, window: int):
    pending = deque(submit(chunk) for chunk in itertools.islice(chunks, window))
    while pending:
        result = pending.popleft().result()
        for chunk in itertools.islice(chunks, 1):
            pending.append(submit(chunk))
        yield result


def ordered_map(fn, chunks, jobs: int, scheduler: str | None = None, **kwargs):
    """Yields fn(chunk, **kwargs) for each chunk, in order, with bounded work in flight."""
    chunks = iter(chunks)
    if scheduler:
        client = dask_client(scheduler)
        try:
            workers = max(1, sum(client.nthreads().values()))
            yield from _windowed(lambda chunk: client.submit(fn, chunk, pure=False, **kwargs), chunks,
                                 WINDOW_PER_WORKER * workers)
        finally:
            client.close()
        return
    if jobs == 1:
        for chunk in chunks:
            yield fn(chunk, **kwargs)
        return
    from joblib.externals.loky import get_reusable_executor

    executor = get_reusable_executor(max_workers=jobs)
    yield from _windowed(lambda chunk: executor.submit(fn, chunk, **kwargs), chunks, WINDOW_PER_WORKER * jobs)
