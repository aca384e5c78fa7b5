import os
import signal
import subprocess
import sys
import time

import pytest

from imgprep.prepare.parallel import (AREA_PREFIX, SHM_DIR, WINDOW_PER_WORKER, Stored, area_prefix, chunked, ordered_map,
                              pid_namespace, resolve_jobs, shared_put, worker_died)


def _stamp(chunk):
    return [(i, time.time()) for i in chunk]


def test_results_come_in_order_and_a_slow_consumer_holds_the_workers_back():
    jobs, items = 2, 60
    started, consumed = [], []  # when each task started; when the consumer took each result
    for k, result in enumerate(ordered_map(_stamp, ([i] for i in range(items)), jobs)):
        index, start = result[0]
        assert index == k
        started.append(start)
        consumed.append(time.time())
        time.sleep(0.03)  # a slow writer
    # how far ahead of the consumer each task started: its index minus the results taken by then.
    # Without back-pressure the last tasks would start ~60 ahead; with it, at most one window.
    ahead = [k - sum(1 for c in consumed if c <= started[k]) for k in range(items)]
    assert max(ahead) <= WINDOW_PER_WORKER * jobs, ahead


def test_chunked_and_resolve_jobs():
    assert list(chunked(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert resolve_jobs(3) == 3 and resolve_jobs(None) >= 1 and resolve_jobs(-1) == resolve_jobs(0)


def _records(chunk, area=None):
    """(item, 40 KB of bytes, how they travelled): through the shared area when there is one."""
    put = shared_put(area)
    refs = [(i, put(bytes([i % 256]) * 40_000)) for i in chunk]
    return [(i, ref, "area" if isinstance(ref, Stored) else "pipe") for i, ref in refs]


def _expected(items, travelled):
    return [[(i, bytes([i % 256]) * 40_000, travelled)] for i in items]


def _areas_of(pid):
    return sorted(SHM_DIR.glob(f"{area_prefix(pid)}*"))


def _areas_of_this_process():
    return _areas_of(os.getpid())


@pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm")
def test_bytes_come_back_through_shared_areas_and_the_areas_go_away():
    items = range(40)
    # areas of 100 KB hold two items; a chunk of three sends its third back through the pipe
    results = list(ordered_map(_records, ([i, i + 1, i + 2] for i in range(0, 39, 3)), 2, area_bytes=100_000))
    assert [r for chunk in results for r in chunk] == [
        (i, bytes([i % 256]) * 40_000, "pipe" if i % 3 == 2 else "area") for i in range(39)]
    assert list(ordered_map(_records, ([i] for i in items), 2, area_bytes=100_000)) == _expected(items, "area")
    assert not _areas_of_this_process()
    stopped = ordered_map(_records, ([i] for i in items), 2, area_bytes=100_000)
    next(stopped)
    assert len(_areas_of_this_process()) == 2 * WINDOW_PER_WORKER + 1
    stopped.close()  # a consumer that gives up (an error in the writer) still removes them
    assert not _areas_of_this_process()


@pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm")
def test_lent_results_are_views_released_when_the_next_result_is_asked_for():
    """With lend=True the consumer gets views of the areas (no copy); the areas are reused by later
    chunks, so a view kept past its turn must fail loudly, never read another chunk's bytes."""
    kept = []
    for k, chunk in enumerate(ordered_map(_records, ([i] for i in range(40)), 2, area_bytes=100_000, lend=True)):
        (i, view, travelled), = chunk
        assert (i, travelled) == (k, "area") and isinstance(view, memoryview)
        assert bytes(view) == bytes([k % 256]) * 40_000
        kept.append(view)
    assert kept and all(_released(view) for view in kept)
    assert not _areas_of_this_process()


@pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm")
def test_an_error_while_a_result_is_lent_still_removes_the_areas():
    """The list of work failing (or a Ctrl-C) between taking a chunk's result and handing it over must
    end with that error and no areas left, not with the areas refusing to close under a live view."""
    def chunks():
        yield from ([i] for i in range(6))
        raise ValueError("the list of work broke")

    with pytest.raises(ValueError, match="the list of work broke"):
        for _ in ordered_map(_records, chunks(), 2, area_bytes=100_000, lend=True):
            pass
    assert not _areas_of_this_process()


def _released(view) -> bool:
    try:
        bytes(view)
    except ValueError:
        return True
    return False


def _records_dying_on(chunk, marker, area=None):
    _dies_on(chunk, marker)
    return _records(chunk, area)


@pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm")
def test_lent_results_of_a_chunk_run_again_item_by_item_are_whole(tmp_path):
    """After a worker's death the chunk runs again item by item, each item in the next of the
    2 * WINDOW_PER_WORKER + 1 areas: with chunks of 8 the areas come round within the chunk, so its
    results must come out as bytes, not as views of areas its later items overwrote."""
    flat = []
    for chunk in ordered_map(_records_dying_on, chunked(range(40), 8), 2, area_bytes=400_000, lend=True,
                             crashed=lambda item, detail: (item, None, detail), marker=str(tmp_path / "m")):
        flat += [(i, value if value is None else bytes(value), travelled) for i, value, travelled in chunk]
    assert [r[0] for r in flat] == list(range(40))
    assert [(i, t) for i, v, t in flat if v is None] == [(13, "its worker process died (SIGKILL(-9))")]
    assert [i for i, v, _ in flat if v is not None and v != bytes([i % 256]) * 40_000] == []
    assert not _areas_of_this_process()


def test_without_room_in_shared_memory_bytes_travel_pickled():
    huge = 1 << 50  # more than any /dev/shm has: no areas, workers get area=None
    assert list(ordered_map(_records, ([i] for i in range(10)), 2, area_bytes=huge)) == _expected(range(10), "pipe")
    assert not _areas_of_this_process()


@pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm")
def test_areas_of_dead_builds_are_swept_and_live_ones_kept():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = SHM_DIR / f"{area_prefix(dead.pid)}0badc0de-0"
    live = SHM_DIR / f"{area_prefix(os.getppid())}0badc0de-0"
    other_namespace = SHM_DIR / f"{AREA_PREFIX}{pid_namespace() + 1}-{dead.pid}-0badc0de-0"  # its pid means nothing here
    stale_semaphore = SHM_DIR / f"sem.loky-{dead.pid}-0badc0de"  # loky's, left by a kill -9
    live_semaphore = SHM_DIR / f"sem.loky-{os.getppid()}-0badc0de"
    made = (stale, live, other_namespace, stale_semaphore, live_semaphore)
    for path in made:
        path.write_bytes(b"x")
    try:
        list(ordered_map(_records, ([i] for i in range(4)), 2, area_bytes=100_000))
        assert not stale.exists() and live.exists() and other_namespace.exists()
        assert not stale_semaphore.exists() and live_semaphore.exists()
    finally:
        for path in made:
            path.unlink(missing_ok=True)


def _dies_on(chunk, marker, area=None):
    """Kills its own worker (as a decoder's segfault or the OOM killer would) on item 13, and on
    item 7 only while `marker` does not exist yet (a one-off kill)."""
    if 13 in chunk or (7 in chunk and not os.path.exists(marker)):
        if 7 in chunk:
            open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return [(i, "done") for i in chunk]


def test_a_dying_worker_costs_only_the_item_that_kills_it(tmp_path):
    results = list(ordered_map(_dies_on, chunked(range(30), 4), 2, crashed=lambda item, detail: (item, detail),
                               marker=str(tmp_path / "seven-died-once")))
    flat = [r for chunk in results for r in chunk]
    assert [r[0] for r in flat] == list(range(30))
    assert [r for r in flat if r[1] != "done"] == [(13, "its worker process died (SIGKILL(-9))")]
    # without `crashed` a dying worker is an error for the caller, as before
    with pytest.raises(Exception) as raised:
        list(ordered_map(_dies_on, chunked(range(30), 4), 2, marker=str(tmp_path / "seven-died-once")))
    assert worker_died(raised.value)


def test_a_dying_worker_anywhere_else_is_a_clean_cli_error(tmp_path):
    """compute-mean (no per-item results) stops with a message, not a traceback."""
    import click
    from click.testing import CliRunner

    from imgprep.cli import Group

    @click.group(cls=Group)
    def cli():
        pass

    @cli.command()
    def work():
        list(ordered_map(_dies_on, chunked(range(30), 4), 2, marker=str(tmp_path / "m")))

    result = CliRunner().invoke(cli, ["work"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith("Error: its worker process died (SIGKILL(-9)"), result.output
    assert "killed for memory, or crashed. Run the same command again" in result.output


WATCHED_WORKER = """
import os, subprocess, sys, time
if sys.argv[1] == "parent":  # starts a worker, says its pid, then waits to be killed
    worker = subprocess.Popen([sys.executable, "-c", __doc__, "worker"])
    print(worker.pid, flush=True)
    time.sleep(600)
else:  # an idle worker, as loky's wait for their next task
    from imgprep.prepare.parallel import _watch_parent
    _watch_parent(interval=0.1)
    time.sleep(600)
"""


def _running(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat", "rb").read().split()[2] != b"Z"
    except FileNotFoundError:
        return False


def test_an_idle_worker_leaves_when_its_build_is_killed():
    """kill -9 of a build's main process: its idle workers exit within a second, instead of idling
    on (loky's 5 minutes) with the build's shared memory mapped."""
    script = f"__doc__ = {WATCHED_WORKER!r}\n{WATCHED_WORKER}"
    parent = subprocess.Popen([sys.executable, "-c", script, "parent"], stdout=subprocess.PIPE)
    worker = int(parent.stdout.readline())
    time.sleep(0.5)
    assert _running(worker)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 5
    while _running(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = _running(worker)
    if alive:
        os.kill(worker, signal.SIGKILL)
    assert not alive

