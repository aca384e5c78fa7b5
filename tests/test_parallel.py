import time

from imgprep.parallel import WINDOW_PER_WORKER, chunked, ordered_map, resolve_jobs


def _stamp(chunk):
    return [(i, time.time()) for i in chunk]


def test_results_come_in_order_and_a_slow_consumer_holds_the_workers_back():
    jobs, consume_s = 2, 0.03
    ahead = []
    for k, result in enumerate(ordered_map(_stamp, ([i] for i in range(60)), jobs)):
        index, started = result[0]
        assert index == k
        ahead.append((time.time() - started) / consume_s)  # how many items ago this task started
        time.sleep(consume_s)
    # a task starts at most about one window before the consumer takes it; without back-pressure
    # the last ones would have started ~60 items ahead
    assert max(ahead[10:]) <= WINDOW_PER_WORKER * jobs + 2, ahead


def test_chunked_and_resolve_jobs():
    assert list(chunked(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert resolve_jobs(3) == 3 and resolve_jobs(None) >= 1 and resolve_jobs(-1) == resolve_jobs(0)
