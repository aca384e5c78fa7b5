"""The epoch plan: which records each rank visits in each epoch, and in which batches."""

import numpy as np
import pytest


def rank_epoch(plan_args, rank, epoch):
    from imgprep.loading.plan import EpochPlan

    plan = EpochPlan(**plan_args, shard_id=rank)
    batches = [plan.batch(epoch, step) for step in range(plan.steps)]
    return plan, batches


def test_epoch_plans_follow_distributed_sampler_semantics_for_every_small_case():
    """Every N < 40, K <= 5, B <= 7, train and eval, drop_last or not: equal steps on every rank,
    coverage and repeats exactly as documented, batches of B (the last partial unless drop_last)."""
    import itertools
    from collections import Counter

    from imgprep.loading.plan import EmptyShard

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
    from imgprep.formats.order import permutation
    from imgprep.loading.plan import EpochPlan

    plan = EpochPlan(50, 8, num_shards=1, seed=4)
    assert plan.rank_records(0).tolist() == permutation(50, 4, 0).tolist()
    assert plan.rank_records(1).tolist() == permutation(50, 4, 1).tolist()
    assert EpochPlan(50, 8, shuffle=False).rank_records(5).tolist() == list(range(50))


def test_epoch_plan_is_pinned():
    # 11 records, 3 ranks: the order repeats its first record to reach 12; rank i takes positions i, i+3, ...
    from imgprep.loading.draws import augmentation
    from imgprep.loading.plan import EpochPlan

    plans = [EpochPlan(11, 2, num_shards=3, shard_id=rank, seed=0) for rank in range(3)]
    assert [p.rank_records(0).tolist() for p in plans] == [[0, 6, 4, 8], [9, 3, 10, 7], [1, 5, 2, 0]]
    assert [p.rank_records(1).tolist() for p in plans] == [[4, 5, 8, 3], [10, 1, 6, 9], [2, 0, 7, 4]]
    crop_x, _, mirror = augmentation(0, 0, np.arange(8))
    assert np.round(crop_x.astype(np.float64), 4).tolist() == [0.4123, 0.1345, 0.8331, 0.1716, 0.204, 0.2606, 0.2967, 0.4309]
    assert mirror.tolist() == [0, 0, 0, 0, 0, 1, 0, 1]


def test_split_steps_gives_a_share_of_the_steps_spread_evenly():
    from imgprep.loading.plan import split_steps

    assert [split_steps(0.4, s) for s in range(10)] == [0, 0, 1, 0, 1, 0, 0, 1, 0, 1]
    assert sum(split_steps(0.35, s) for s in range(1000)) == 350


# --- the position: what a loader saves and restores, without DALI ---------------------------------

def visit(position, stop_after=None):
    """(epoch, step, records) of the batches a loader's `for` hands out from `position`, stopping
    (as a `break` does) after `stop_after` batches."""
    out = []
    for epoch, step in position.epoch_steps():
        out.append((epoch, step, position.plan.batch(epoch, step)[0].tolist()))
        position.advance()
        if stop_after is not None and len(out) == stop_after:
            break
    return out


def make_position(**changes):
    from imgprep.loading.plan import EpochPlan, Position

    args = dict(records=23, batch_size=4, num_shards=2, shard_id=1, seed=5)
    return Position(EpochPlan(**{**args, **changes}), {"train": True, "policy": "caffe"})


def test_position_state_round_trips_through_json_into_another_position():
    import json

    position = make_position()
    visit(position)
    visit(position, stop_after=2)
    state = json.loads(json.dumps(position.state_dict()))
    assert (state["epoch"], state["step"]) == (1, 2) and state["policy"] == "caffe"
    restored = make_position()
    restored.load_state_dict(state)
    restored.set_epoch(1)  # a torch loop calls it after restoring: it keeps the step
    assert visit(restored) == visit(position)  # the rest of epoch 1, the same batches
    assert restored.state_dict() == position.state_dict() and (restored.epoch, restored.step) == (2, 0)


@pytest.mark.parametrize("change", [dict(seed=6), dict(batch_size=5), dict(num_shards=3), dict(records=24),
                                    dict(shuffle=False), dict(drop_last=True)])
def test_position_refuses_a_state_for_another_order(change):
    from imgprep import ImgprepError

    state = make_position().state_dict()
    with pytest.raises(ImgprepError, match="for another order"):
        make_position(**change).load_state_dict(state)
    with pytest.raises(ImgprepError, match="for another order: policy"):
        make_position().load_state_dict({**state, "policy": "resnet"})
    with pytest.raises(ImgprepError, match="not in this loader's epochs"):
        make_position().load_state_dict({**state, "step": 3})  # 12 samples a rank: steps 0..2
    with pytest.raises(ImgprepError, match="not a loader state"):
        make_position().load_state_dict({**state, "format": 2})


def test_a_break_mid_epoch_then_the_next_epoch_gives_the_uninterrupted_batches():
    whole = make_position()
    expected = visit(whole) + visit(whole)
    position = make_position()
    first = visit(position, stop_after=1)
    assert (position.epoch, position.step) == (0, 1)
    rest = visit(position)  # the next `for` finishes epoch 0 from step 1
    assert first + rest + visit(position) == expected
    assert (position.epoch, position.step) == (2, 0)


def test_an_iteration_stops_where_the_position_moves():
    position = make_position()
    steps = position.epoch_steps()
    assert next(steps) == (0, 0)
    position.advance()
    position.set_epoch(4)  # another epoch: the open iteration stops, the next starts at (4, 0)
    assert list(steps) == []
    older, newer = position.epoch_steps(), position.epoch_steps()
    assert next(newer) == (4, 0) and list(older) == []
    position.set_epoch(4)  # already in epoch 4: nothing moves
    assert next(newer) == (4, 0)
