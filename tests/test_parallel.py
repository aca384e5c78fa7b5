import time

from imgprep.parallel import WINDOW_PER_WORKER, chunked, ordered_map, resolve_jobs


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
