"""Ordered, bounded parallel map over chunks of work, on joblib (local processes or Dask)."""

from __future__ import annotations

import itertools
import os
from contextlib import nullcontext

from joblib import Parallel, delayed, parallel_config

from . import ImgprepError


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


def _backend_context(scheduler: str | None):
    if not scheduler:
        return nullcontext()
    try:
        from dask.distributed import Client
    except ImportError:
        raise ImgprepError("--scheduler needs the dask extra: pip install 'imgprep[dask]'") from None
    try:
        client = Client(scheduler, timeout="10s")
    except (OSError, TimeoutError) as e:
        raise ImgprepError(f"cannot reach the Dask scheduler at {scheduler}: {e}") from None
    return _DaskContext(client)


class _DaskContext:
    def __init__(self, client):
        self.client = client
        self.config = parallel_config(backend="dask")

    def __enter__(self):
        self.config.__enter__()
        return self

    def __exit__(self, *exc):
        self.config.__exit__(*exc)
        self.client.close()


def ordered_map(fn, chunks, jobs: int, scheduler: str | None = None, **kwargs):
    """Yields fn(chunk, **kwargs) for each chunk, in order, with at most about 2*jobs chunks in
    flight, so memory stays bounded however long `chunks` is."""
    if jobs == 1 and not scheduler:
        for chunk in chunks:
            yield fn(chunk, **kwargs)
        return
    with _backend_context(scheduler):
        parallel = Parallel(n_jobs=jobs if not scheduler else -1, return_as="generator",
                            pre_dispatch="2*n_jobs", batch_size=1)
        yield from parallel(delayed(fn)(chunk, **kwargs) for chunk in chunks)
