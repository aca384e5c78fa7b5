"""Ordered, bounded parallel map over chunks of work: local processes (forked, see `_LocalPool`) or
a Dask cluster.

At most `2 x workers` chunks are outstanding (running, or done and waiting for the consumer); the
next chunk is submitted only when the consumer takes a result. So a consumer slower than the
workers (a writer on a slow disk) holds the workers back instead of letting results pile up in
memory. (joblib's `Parallel(return_as="generator")` keeps dispatching as tasks finish, whatever
the consumer does, so it is not used here.)

Local workers can hand bulky bytes (raw records) back through shared memory instead of pickling
them through the executor's pipe: each chunk in flight gets an area of `area_bytes` in /dev/shm,
the worker puts its bytes there (`shared_put`) and returns `Stored` references, and the consumer
copies them out before the area is reused (measured on 2 cores, output on tmpfs: +26% for raw
196 KB records, no change for JPEG records).

A worker process that dies (a decoder's segfault, the OOM killer) breaks the executor and every
task in flight; with `crashed`, the oldest chunk then runs again item by item in fresh workers, the
rest are resubmitted, and only an item that kills its worker again is given up (as crashed()).
"""

from __future__ import annotations

import functools
import itertools
import mmap
import os
import re
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from imgprep import ImgprepError

WINDOW_PER_WORKER = 2
SHM_DIR = Path("/dev/shm")
AREA_PREFIX = "imgprep-"


@dataclass(frozen=True)
class Stored:
    """Where a worker left `length` bytes in its chunk's shared area."""

    offset: int
    length: int


@dataclass(frozen=True)
class SharedArea:
    """One chunk's shared-memory area, as its worker sees it (it travels by name)."""

    name: str
    size: int


def shared_put(area: SharedArea | None):
    """Worker side, once per chunk: put(*parts) -> a Stored reference to the parts' bytes, written one
    after another, when they fit in what is left of the area, else their bytes joined (which then
    travel back pickled, as without an area)."""
    if area is None:
        return lambda *parts: b"".join(parts)  # one bytes part is returned as it is, not copied
    view = _mapping(area)
    used = 0

    def put(*parts):
        nonlocal used
        start = used
        if start + sum(map(len, parts)) > area.size:
            return b"".join(parts)
        for part in parts:
            view[used:used + len(part)] = part
            used += len(part)
        return Stored(start, used - start)

    return put


_MAPPED: dict[str, mmap.mmap] = {}  # this worker's mappings of the current build's areas


def _mapping(area: SharedArea) -> mmap.mmap:
    """Mapped once per worker and build (mapping an area for every chunk pays its page faults every
    time: measured, no gain left); an idle worker keeps the last build's mappings until its next
    build or its exit."""
    view = _MAPPED.get(area.name)
    if view is None:
        build = area.name.rsplit("-", 1)[0]
        for name in [n for n in _MAPPED if n.rsplit("-", 1)[0] != build]:  # an earlier build's areas
            _MAPPED.pop(name).close()
        fd = os.open(SHM_DIR / area.name, os.O_RDWR)
        try:
            view = _MAPPED[area.name] = mmap.mmap(fd, area.size)
        finally:
            os.close(fd)
    return view


def resolve_jobs(jobs: int | None) -> int:
    """`None` or <= 0 means every core this process may use."""
    if jobs and jobs > 0:
        return jobs
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def chunked(iterable, size):
    """Lists of `size` items (the last may be shorter) from `iterable`; `size` may be a function,
    asked before each list is made."""
    it = iter(iterable)
    while chunk := list(itertools.islice(it, size() if callable(size) else size)):
        yield chunk


def dask_client(scheduler: str):
    """A Dask client connected to `scheduler`, or a clear error naming it."""
    try:
        from dask.distributed import Client
    except ImportError:
        raise ImgprepError("--scheduler needs the dask extra: pip install 'imgprep[dask]'") from None
    try:
        return Client(scheduler, timeout="10s")
    except (OSError, TimeoutError) as e:
        raise ImgprepError(f"cannot reach the Dask scheduler at {scheduler}: {e}") from None


def worker_died(error: BaseException) -> bool:
    """A worker process died under its task (a decoder's segfault, the OOM killer): a local pool's
    BrokenProcessPool (WorkerDied), or Dask's KilledWorker."""
    if isinstance(error, BrokenProcessPool):
        return True
    return type(error).__name__ == "KilledWorker"  # dask.distributed, without importing it


def died_how(error: BaseException) -> str:
    """How a worker died, in words (the signal or exit code), from the pool's error."""
    codes = re.search(r"exit codes of the workers are \{([^}]*)\}", str(error))
    return f"its worker process died ({codes[1] if codes else type(error).__name__})"


def _submitted(submit, chunk):
    """submit(chunk), or a future holding the error when a worker's death broke the executor just
    before the call (the executor refuses work then, instead of failing the task's future)."""
    try:
        return submit(chunk)
    except Exception as error:
        if not worker_died(error):
            raise
        failed = Future()
        failed.set_exception(error)
        return failed


def _windowed(submit, chunks, window: int, crashed=None, restart=lambda: None):
    """Results of submit(chunk) in order, `window` chunks ahead. With `crashed`, a chunk whose worker
    died runs again item by item in fresh workers, and an item that kills its worker again becomes
    crashed(item, detail); `restart` replaces a broken executor."""
    submit = functools.partial(_submitted, submit)
    pending = deque((chunk, submit(chunk)) for chunk in itertools.islice(chunks, window))
    while pending:
        chunk, future = pending.popleft()
        try:
            result = future.result()
        except Exception as error:
            if crashed is None or not worker_died(error):
                raise
            restart()
            result = [out for item in chunk for out in _alone(submit, item, crashed, restart)]
            pending = deque((waiting, submit(waiting)) for waiting, _ in pending)  # they died with it
        for chunk in itertools.islice(chunks, 1):
            pending.append((chunk, submit(chunk)))
        yield result


def _alone(submit, item, crashed, restart) -> list:
    try:
        future = submit([item])  # copied out, not lent: the next item's run reuses the areas
        return future.copied() if isinstance(future, _CopyingOut) else future.result()
    except Exception as error:
        if not worker_died(error):
            raise
        restart()
        return [crashed(item, died_how(error))]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        pass
    return True


def pid_namespace() -> int:
    """This process's pid namespace: a pid means something only within it, and containers sharing
    /dev/shm (hostIPC) may run builds in other namespaces."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def area_prefix(pid: int) -> str:
    """The names of the areas a build process `pid` of this namespace makes start with this."""
    return f"{AREA_PREFIX}{pid_namespace()}-{pid}-"


def _remove_stale_areas() -> None:
    """Areas left by builds in this pid namespace that were killed with their whole process group
    (so Python's resource tracker, which cleans up after a lone killed process, died too), and the
    semaphores that joblib's loky executor (which older imgprep versions used) made for them
    (`sem.loky-<pid>-<random>`)."""
    for path in SHM_DIR.glob(f"{AREA_PREFIX}{pid_namespace()}-*"):
        owner = path.name[len(AREA_PREFIX):].split("-")[1]
        if owner.isdigit() and not _pid_alive(int(owner)):
            path.unlink(missing_ok=True)
    _remove_stale_semaphores()


def _remove_stale_semaphores() -> None:
    """loky's semaphore names carry no pid namespace, so one is removed only when it is this user's,
    its creator's pid is dead here, and no process visible here has it mapped (sem_open maps it)."""
    uid = os.getuid()
    stale = []
    for path in SHM_DIR.glob("sem.loky-*"):
        owner = path.name.split("-")[1]
        try:
            mine = path.stat().st_uid == uid
        except OSError:
            continue
        if mine and owner.isdigit() and not _pid_alive(int(owner)):
            stale.append(path)
    if not stale:
        return
    in_use = _mapped_shm_names()
    for path in stale:
        if path.name not in in_use:
            path.unlink(missing_ok=True)


def _mapped_shm_names() -> set[str]:
    names = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # gone, or another user's
            continue
        names.update(m[1] for m in re.finditer(r"/dev/shm/(sem\.loky-\S+)", text))
    return names


@contextmanager
def _shared_areas(count: int, size: int):
    """`count` areas of `size` bytes as [(SharedArea, buffer)], or [] where /dev/shm is missing or
    lacks twice the room (a full tmpfs would kill the workers with SIGBUS)."""
    if size:
        _remove_stale_areas()  # first: what killed builds left takes room
    try:
        stat = os.statvfs(SHM_DIR)
        room = stat.f_bavail * stat.f_frsize >= 2 * count * size
    except OSError:
        room = False
    if not size or not room:
        yield []
        return
    from multiprocessing import shared_memory

    name = f"{area_prefix(os.getpid())}{os.urandom(4).hex()}-"
    made = []
    try:
        for k in range(count):
            made.append(shared_memory.SharedMemory(f"{name}{k}", create=True, size=size))
        yield [(SharedArea(m.name, size), m.buf) for m in made]
    finally:
        for m in made:
            m.close()
            m.unlink()


def _copy_out(result, buffer, lent: list | None = None):
    """`result` with every Stored reference (in lists and tuples) replaced by its bytes or, with a
    `lent` list, by a view of the area (appended to `lent`)."""
    if isinstance(result, Stored):
        view = buffer[result.offset:result.offset + result.length]
        if lent is None:
            with view:
                return bytes(view)
        lent.append(view)
        return view
    if isinstance(result, (list, tuple)):
        return type(result)(_copy_out(item, buffer, lent) for item in result)
    return result


class _Lent:
    """A result holding views of its chunk's area, released (`release`) once the consumer is done with it;
    until then it is in `outstanding`, so that an error anywhere can release it before the areas close."""

    def __init__(self, result, views: list, outstanding: set):
        self.result, self.views, self.outstanding = result, views, outstanding
        outstanding.add(self)

    def release(self) -> None:
        for view in self.views:
            view.release()
        self.views = []
        self.outstanding.discard(self)


class _CopyingOut:
    """A future whose result has its Stored bytes copied out of the area (freeing it for reuse) or,
    with an `outstanding` set, lent as views of the area (a _Lent, kept in the set until released)."""

    def __init__(self, future, buffer, outstanding: set | None = None):
        self.future, self.buffer, self.outstanding = future, buffer, outstanding

    def copied(self):
        """The result with its bytes copied out of the area, whether or not this future lends."""
        return _copy_out(self.future.result(), self.buffer)

    def result(self):
        if self.outstanding is None:
            return self.copied()
        views: list = []
        try:
            return _Lent(_copy_out(self.future.result(), self.buffer, views), views, self.outstanding)
        except BaseException:
            for view in views:
                view.release()
            raise


def _returned(results):
    """The consumer's side of lent results: each _Lent's views are released when the next result is
    asked for (or the consumer stops), so a view kept past that fails loudly instead of reading an
    area a later chunk has overwritten."""
    for result in results:
        if not isinstance(result, _Lent):
            yield result
            continue
        try:
            yield result.result
        finally:
            result.release()


def ordered_map(fn, chunks, jobs: int, scheduler: str | None = None, area_bytes: int = 0, crashed=None,
                lend: bool = False, **kwargs):
    """Yields fn(chunk, **kwargs) for each chunk, in order, with bounded work in flight.

    With `area_bytes`, local workers also get `area=` (a SharedArea for `shared_put`) where /dev/shm
    has room, so `fn` takes `area=None`; results come back with the bytes in place of references,
    or with `lend` as memoryviews of the area, valid until the next result is asked for (then
    released: the area takes a later chunk's results), which saves copying them out.
    With `crashed(item, detail)`, fn returns one result per item, and a worker that dies (a decoder
    crash, the OOM killer) costs only the item that killed it, which gets crashed()'s result."""
    chunks = iter(chunks)
    if scheduler:
        client = dask_client(scheduler)
        try:
            workers = max(1, sum(client.nthreads().values()))
            yield from _windowed(lambda chunk: client.submit(fn, chunk, pure=False, **kwargs), chunks,
                                 WINDOW_PER_WORKER * workers, crashed)
        finally:
            client.close()
        return
    if jobs == 1:
        for chunk in chunks:
            yield fn(chunk, **kwargs)
        return
    pool = _LocalPool(jobs)
    window = WINDOW_PER_WORKER * jobs
    try:
        # window + 1 areas: the chunk being copied out, and `window` in flight
        with _shared_areas(window + 1, area_bytes) as areas:
            if not areas:
                yield from _windowed(lambda chunk: pool.submit(fn, chunk, **kwargs), chunks, window, crashed,
                                     pool.restart)
                return
            turn = itertools.cycle(areas)
            outstanding: set | None = set() if lend else None

            def submit(chunk):
                area, buffer = next(turn)
                return _CopyingOut(pool.submit(fn, chunk, area=area, **kwargs), buffer, outstanding)

            try:
                yield from _returned(_windowed(submit, chunks, window, crashed, pool.restart))
            finally:  # an error between taking a result and handing it over leaves it lent
                for result in list(outstanding or ()):
                    result.release()
    except BaseException:  # Ctrl-C, an error, or the consumer stopped: no worker lingers
        pool.kill()
        raise
    pool.close()


class WorkerDied(BrokenProcessPool):
    """A local worker process died under its task; the message names how (its exit code or signal)."""


class _LocalPool:
    """`jobs` worker processes forked from this one when the first chunk is submitted (all of them at
    once, from the main thread, with SIGINT blocked): a fork inherits the modules this process has
    imported, where a fresh interpreter per worker (loky's, or spawn) pays Python's start-up and every
    import again, about 0.3-0.5 s of CPU per worker (measured on 2 cores: a build of 40 images cost
    1.4 s of CPU with loky's workers, 0.45 s forked). The workers belong to one map: `close` ends them,
    so none outlives it holding this process's files (OUT's lock) open."""

    def __init__(self, jobs: int):
        self.jobs = jobs
        self.executor = self._executor()
        self.processes: dict = {}  # pid -> Process, kept for their exit codes once the executor breaks

    def _executor(self):
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(self.jobs, mp_context=_context(), initializer=_watch_parent)

    def submit(self, fn, chunk, **kwargs):
        with _sigint_blocked():  # workers started here never see the terminal's Ctrl-C
            future = self.executor.submit(fn, chunk, **kwargs)
        self.processes.update(getattr(self.executor, "_processes", None) or {})
        return _Died(future, self)

    def exit_codes(self) -> str:
        """The exit codes of the workers that ended, as `{SIGKILL(-9)}`; those the executor stopped
        itself once one had died (SIGTERM) are left out when another is there."""
        deadline = time.monotonic() + 2  # a dead worker's code is there once the kernel has reaped it
        for process in self.processes.values():
            process.join(max(0.0, deadline - time.monotonic()))
        codes = sorted({p.exitcode for p in self.processes.values() if p.exitcode}, key=abs)
        if len(codes) > 1:
            codes = [c for c in codes if c != -signal.SIGTERM]
        return "{" + ", ".join(f"{signal.Signals(-c).name}({c})" if c < 0 else f"EXIT({c})" for c in codes) + "}"

    def restart(self) -> None:
        """A broken executor (a worker died) is replaced by a new one with fresh workers."""
        self.kill()
        self.executor, self.processes = self._executor(), {}

    def kill(self) -> None:
        for process in self.processes.values():
            process.kill()
        self.executor.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        self.executor.shutdown(wait=True)


class _Died:
    """A worker's future whose BrokenProcessPool says which exit codes the workers had."""

    def __init__(self, future, pool: _LocalPool):
        self.future, self.pool = future, pool

    def result(self):
        try:
            return self.future.result()
        except BrokenProcessPool:
            raise WorkerDied(f"a worker process died; the exit codes of the workers are "
                             f"{self.pool.exit_codes()}") from None


def _context():
    """fork where the platform has it, else spawn."""
    import multiprocessing

    return multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


def _watch_parent(interval: float = 0.5) -> None:
    """Worker side: exits when the process that started it is gone (kill -9 of a build), instead of
    waiting for work forever with its shared memory mapped."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="imgprep-parent-watch", daemon=True).start()


@contextmanager
def _sigint_blocked():
    """SIGINT blocked in the main thread while worker processes (and the executor's threads) may start: they
    inherit the blocked signal, so Ctrl-C, which the terminal sends to the whole process group, reaches
    only the main process, which stops them. A Ctrl-C that comes meanwhile is delivered on leaving."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
