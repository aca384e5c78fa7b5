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


def rank_epoch(plan_args, rank, epoch):
    from imgprep.formats.order import EpochPlan

    plan = EpochPlan(**plan_args, shard_id=rank)
    batches = [plan.batch(epoch, step) for step in range(plan.steps)]
    return plan, batches


def test_epoch_plans_follow_distributed_sampler_semantics_for_every_small_case():
    """Every N < 40, K <= 5, B <= 7, train and eval, drop_last or not: equal steps on every rank,
    coverage and repeats exactly as documented, batches of B (the last partial unless drop_last)."""
    import itertools
    from collections import Counter

    from imgprep.formats.order import EmptyShard

    for n, k, b, drop_last, eval_ in itertools.product(range(1, 40), range(1, 6), range(1, 8), (False, True), (False, True)):
        args = dict(records=n, batch_size=b, num_shards=k, seed=n * 7 + k, shuffle=not eval_, drop_last=drop_last,
                    mark_padding=eval_)
        try:
            plans = [rank_epoch(args, rank, 3) for rank in range(k)]
        except EmptyShard:
            assert drop_last and n // k < b
            continue
        steps = {len(batches) for _, batches in plans}
        assert len(steps) == 1  # every rank runs the same number of steps
        per_rank = n // k if drop_last else -(-n // k)
        assert steps == {per_rank // b if drop_last else -(-per_rank // b)}
        visits = Counter()
        for _, batches in plans:
            sizes = [len(records) for records, _, _ in batches]
            assert all(size == b for size in sizes[:-1]) and 0 < sizes[-1] <= b
            if drop_last:
                assert sizes[-1] == b
            for records, positions, real in batches:
                visits.update(records[real].tolist())
                if not eval_:
                    assert real.all()
        if drop_last:
            assert all(c == 1 for c in visits.values())  # never a repeat; cut records differ by epoch
        elif eval_:
            assert sorted(visits.elements()) == list(range(n))  # exactly once across ranks, padding marked
        else:
            assert set(visits) == set(range(n))  # at least once
            assert sum(visits.values()) - n == -(-n // k) * k - n < k  # the only repeats: fewer than K


def test_epoch_orders_reshuffle_per_epoch_and_eval_keeps_key_order():
    from imgprep.formats.order import EpochPlan, permutation

    plan = EpochPlan(50, 8, num_shards=1, seed=4)
    assert plan.rank_records(0).tolist() == permutation(50, 4, 0).tolist()
    assert plan.rank_records(1).tolist() == permutation(50, 4, 1).tolist()
    assert EpochPlan(50, 8, shuffle=False).rank_records(5).tolist() == list(range(50))


def test_epoch_plan_is_pinned():
    # 11 records, 3 ranks: the order repeats its first record to reach 12; rank i takes positions i, i+3, ...
    from imgprep.formats.order import EpochPlan, augmentation

    plans = [EpochPlan(11, 2, num_shards=3, shard_id=rank, seed=0) for rank in range(3)]
    assert [p.rank_records(0).tolist() for p in plans] == [[0, 6, 4, 8], [9, 3, 10, 7], [1, 5, 2, 0]]
    assert [p.rank_records(1).tolist() for p in plans] == [[4, 5, 8, 3], [10, 1, 6, 9], [2, 0, 7, 4]]
    crop_x, _, mirror = augmentation(0, 0, np.arange(8))
    assert np.round(crop_x.astype(np.float64), 4).tolist() == [0.4123, 0.1345, 0.8331, 0.1716, 0.204, 0.2606, 0.2967, 0.4309]
    assert mirror.tolist() == [0, 0, 0, 0, 0, 1, 0, 1]


def test_augmentation_follows_the_documented_algorithm():
    from imgprep.formats.order import augmentation

    for seed, epoch in [(0, 0), (9, 4), (-1, 2)]:
        positions = np.array([0, 1, 77, 10**6])
        crop_x, crop_y, mirror = augmentation(seed, epoch, positions)
        stream = reference_mix((reference_mix(seed & MASK) + epoch) & MASK)
        for n, p in enumerate(positions.tolist()):
            u = [(reference_mix((reference_mix(stream ^ p) + lane + 1) & MASK) >> 11) / 2**53 for lane in range(3)]
            assert (crop_x[n], crop_y[n], mirror[n]) == (np.float32(u[0]), np.float32(u[1]), int(u[2] < 0.5))


def test_split_steps_gives_a_share_of_the_steps_spread_evenly():
    from imgprep.formats.order import split_steps

    assert [split_steps(0.4, s) for s in range(10)] == [0, 0, 1, 0, 1, 0, 0, 1, 0, 1]
    assert sum(split_steps(0.35, s) for s in range(1000)) == 350
