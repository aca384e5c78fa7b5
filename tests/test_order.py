import numpy as np

from imgprep.formats.order import mix, permutation

MASK = (1 << 64) - 1


def reference_mix(x: int) -> int:
    """SplitMix64's finaliser in plain Python integers, as the module docstring states it."""
    z = (x + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def test_mix_is_splitmix64():
    # SplitMix64 seeded with 0 outputs 0xE220A8397B1DCDAF first (Vigna's reference implementation)
    assert int(mix(np.array([0], np.uint64))[0]) == 0xE220A8397B1DCDAF
    values = [0, 1, 2**32, 2**63, MASK, 123456789]
    assert mix(np.array(values, np.uint64)).tolist() == [reference_mix(v) for v in values]


def test_permutation_follows_the_documented_algorithm():
    for count, seed, epoch in [(1, 0, 0), (37, 5, 2), (1000, 2**40, 9), (257, -3, 0)]:
        stream = reference_mix((reference_mix(seed & MASK) + epoch) & MASK)
        expected = sorted(range(count), key=lambda i: reference_mix(stream ^ i))
        assert permutation(count, seed, epoch).tolist() == expected


def test_permutation_is_pinned():
    # Pinned so that a dependency upgrade cannot change an order silently: these orders decide
    # which records a database holds where (build-lmdb --shuffle) and what each epoch visits.
    assert permutation(10, 0, 0).tolist() == [0, 9, 1, 6, 3, 5, 4, 2, 8, 7]
    assert permutation(10, 0, 1).tolist() == [4, 2, 5, 1, 0, 8, 6, 7, 3, 9]
    assert permutation(10, 1, 0).tolist() == [2, 5, 8, 9, 1, 4, 6, 0, 3, 7]
    assert permutation(12, 2**63 + 5, 7).tolist() == [4, 0, 2, 10, 5, 7, 1, 6, 8, 11, 3, 9]


def test_permutation_is_a_permutation_and_varies_with_seed_and_epoch():
    n = 100_003
    orders = [permutation(n, s, e) for s, e in [(0, 0), (0, 1), (1, 0)]]
    for order in orders:
        assert order.dtype == np.int64 and np.array_equal(np.sort(order), np.arange(n))
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[0], orders[2])
    assert permutation(0, 3).tolist() == []
