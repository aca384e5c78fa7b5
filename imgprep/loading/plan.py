"""Which records each rank visits in each epoch, and in which batches (`EpochPlan`), and where a
loader is in them (`Position`, which its state dict saves and restores): no DALI here."""

from __future__ import annotations

import numpy as np

from imgprep import ImgprepError
from imgprep.formats.order import permutation


class EmptyShard(ValueError):
    """The plan gives a rank no batch at all."""


class EpochPlan:
    """Which records rank `shard_id` of `num_shards` visits in each epoch, and in which batches.

    Epoch e's order is `permutation(records, seed, e)` (or 0..records-1 without `shuffle`). As
    torch.utils.data.DistributedSampler does, the order is made a multiple of `num_shards` long,
    by repeating it from its start (T = ceil(N/K)*K), or with `drop_last` by cutting it
    (T = floor(N/K)*K), and rank i takes the positions i, i+K, i+2K, ... of that sequence. Every
    rank so holds T/K samples and runs the same number of steps: ceil(T/K / B) (the last batch
    partial), or floor(T/K / B) with `drop_last` (only full batches).

    Training visits every record at least once per epoch; the only repeats are the T-N < K
    samples that even the ranks out. Evaluation (`mark_padding`) visits every record exactly once
    across ranks: the T-N positions past the end are padding, marked so metrics can skip them.
    """

    def __init__(self, records: int, batch_size: int, num_shards: int = 1, shard_id: int = 0, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = False, mark_padding: bool = False):
        if records < 1 or batch_size < 1 or num_shards < 1 or not 0 <= shard_id < num_shards:
            raise ValueError(f"bad plan: {records} records, batch {batch_size}, shard {shard_id} of {num_shards}")
        self.records, self.batch_size, self.num_shards, self.shard_id = records, batch_size, num_shards, shard_id
        self.seed, self.shuffle, self.drop_last, self.mark_padding = seed, shuffle, drop_last, mark_padding
        self.total = (records // num_shards if drop_last else -(-records // num_shards)) * num_shards
        self.per_rank = self.total // num_shards
        self.steps = self.per_rank // batch_size if drop_last else -(-self.per_rank // batch_size)
        if self.steps == 0:
            raise EmptyShard(f"{records} records give each of {num_shards} shard(s) {self.per_rank} samples, "
                             f"less than one batch of {batch_size}, and drop_last drops it")
        self.samples = self.steps * batch_size if drop_last else self.per_rank  # per rank and epoch
        self._cache: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s order of all records (before padding or cutting)."""
        if self.shuffle:
            return permutation(self.records, self.seed, epoch)
        return np.arange(self.records, dtype=np.int64)

    def rank_positions(self, epoch: int) -> np.ndarray:
        """Positions (in the padded or cut sequence) this rank visits in `epoch`, in order."""
        return np.arange(self.shard_id, self.total, self.num_shards, dtype=np.int64)[:self.samples]

    def rank_records(self, epoch: int) -> np.ndarray:
        """Record indices this rank visits in `epoch`, in order (cached for the last two epochs)."""
        if epoch not in self._cache:
            sequence = np.resize(self.order(epoch), self.total)  # repeats the order from its start
            self._cache[epoch] = sequence[self.rank_positions(epoch)]
            for old in [e for e in self._cache if e < epoch - 1 or e > epoch + 1]:
                del self._cache[old]
        return self._cache[epoch]

    def batch(self, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(record indices, positions, real) of batch `step` of `epoch`; `real` is False only for
        evaluation padding."""
        if not 0 <= step < self.steps:
            raise IndexError(f"step {step} is not in 0..{self.steps - 1}")
        window = slice(step * self.batch_size, min((step + 1) * self.batch_size, self.samples))
        positions = self.shard_id + self.num_shards * np.arange(window.start, window.stop, dtype=np.int64)
        real = positions < self.records if self.mark_padding else np.ones(len(positions), bool)
        return self.rank_records(epoch)[window], positions, real

    def after(self, epoch: int, step: int) -> tuple[int, int]:
        """The (epoch, step) that follows batch `step` of `epoch`."""
        return (epoch, step + 1) if step + 1 < self.steps else (epoch + 1, 0)


def split_steps(share: float, step: int) -> int:
    """Which of two pipelines runs batch `step`: 1 for a `share` of the steps, spread evenly
    (step s goes to pipeline 1 when floor((s+1)*share) > floor(s*share)), else 0."""
    return int(np.floor((step + 1) * share) > np.floor(step * share))


STATE_FORMAT = 1


class Position:
    """Where a loader is in its plan: the (epoch, step) its next batch comes from, and the state
    dict that saves it.

    `epoch_steps()` gives the (epoch, step) of each remaining batch of the current epoch; the
    caller hands that batch out and calls `advance()`. After a whole epoch the position is at
    (e+1, 0); after a break at step s it is at s (the batches handed out are behind it). An
    iteration stops where the position moves elsewhere (`set_epoch`, `load_state_dict`, another
    `epoch_steps()`). `identity` holds what besides the plan fixes the batches (the loader's
    `train` and policy); it is saved with the position and a state for another one is refused."""

    def __init__(self, plan: EpochPlan, identity: dict | None = None):
        self.plan, self.identity = plan, dict(identity or {})
        self.epoch, self.step = 0, 0
        self._moves = 0  # how often the position jumped or an iteration began: an older iteration stops

    def epoch_steps(self):
        """An iterator over the (epoch, step) of the batches left in the current epoch (see the class)."""
        self._moves += 1
        return self._steps(self._moves)

    def _steps(self, moves: int):
        epoch = self.epoch
        while self.epoch == epoch and self._moves == moves:
            yield epoch, self.step

    def advance(self) -> None:
        """Moves past the batch at the position, to the next step (or the next epoch's first)."""
        self.epoch, self.step = self.plan.after(self.epoch, self.step)

    def set_epoch(self, epoch: int) -> None:
        """Moves to the start of `epoch`, unless the position is already in it (so calling it after
        `load_state_dict`, as a torch training loop does, keeps the restored step)."""
        if epoch < 0:
            raise ImgprepError(f"epoch must be >= 0, not {epoch}")
        if epoch != self.epoch:
            self.epoch, self.step = epoch, 0
            self._moves += 1

    def state_dict(self) -> dict:
        """The position and what fixes the order; JSON-serialisable, the same on every rank."""
        plan = self.plan
        return {"format": STATE_FORMAT, "epoch": self.epoch, "step": self.step, "seed": plan.seed,
                "records": plan.records, "num_shards": plan.num_shards, "batch_size": plan.batch_size,
                "drop_last": plan.drop_last, "shuffle": plan.shuffle, **self.identity}

    def load_state_dict(self, state: dict) -> None:
        """Moves to the position `state` saved (from `state_dict()`, possibly another process's or
        rank's); an ImgprepError when it is not a state, is for another order, or its position is
        not in this plan's epochs."""
        mine = self.state_dict()
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ImgprepError(f"not a loader state (format {STATE_FORMAT}): {str(state)[:200]}")
        differ = [f"{k} {state.get(k)!r} (this loader: {mine[k]!r})" for k in mine
                  if k not in ("epoch", "step") and state.get(k) != mine[k]]
        if differ:
            raise ImgprepError("the saved loader state is for another order: " + ", ".join(differ))
        missing = [k for k in ("epoch", "step") if k not in state]
        if missing:
            raise ImgprepError(f"the saved loader state has no {' or '.join(missing)}: {str(state)[:200]}")
        epoch, step = state["epoch"], state["step"]
        if not (type(epoch) is int and type(step) is int and epoch >= 0 and 0 <= step < self.plan.steps):
            raise ImgprepError(f"saved position epoch {epoch!r}, step {step!r} is not in this loader's "
                               f"epochs of {self.plan.steps} steps")
        self.epoch, self.step = epoch, step
        self._moves += 1
