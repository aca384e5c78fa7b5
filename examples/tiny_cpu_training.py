"""A few SGD steps of a tiny CNN on CPU, fed by the imgprep DALI loader (DALI's CPU mode).

    python examples/tiny_cpu_training.py build/imagenet/train_lmdb --steps 30

The network's head has one output per class present in the database (its labels, read in one pass
over the records, are mapped to 0..K-1): on a sample of K classes the loss starts near log(K) and,
with SGD at rate 0.05 and momentum 0.9, falls steadily (a 1000-way head on a few classes would
start near log(1000) and jump about). Prints the loss per step and, at the end, the mean of the
first and last five steps; used by the tests to see the loss fall. Needs only torch.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from imgprep.formats.codec import decode_datum
from imgprep.loading.loader import Loader
from imgprep.formats.storage import Reader


def tiny_net(num_classes: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.AvgPool2d(4),  # 224 -> 56: the classes of the sample differ in colour and texture
        torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, num_classes))


def database_labels(db) -> list[int]:
    """The labels present in the database, sorted (one pass over its records)."""
    with Reader(db) as reader:
        return sorted({decode_datum(value).label for _, value in reader.items()})


def train(db, steps: int = 30, batch: int = 32, lr: float = 0.05, momentum: float = 0.9,
          seed: int = 0) -> list[float]:
    """`steps` SGD steps on the database's records; the loss of each step."""
    torch.manual_seed(seed)
    labels = database_labels(db)
    index = torch.full((max(labels) + 1,), -1, dtype=torch.long)
    index[labels] = torch.arange(len(labels))  # label -> the head's output
    losses = []
    with Loader(db, batch_size=batch, train=True, device="cpu", output="torch", seed=seed) as loader:
        model = tiny_net(len(labels))
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        while len(losses) < steps:
            for images, targets in loader:
                loss = F.cross_entropy(model(images), index[targets.long()])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                if len(losses) == steps:
                    break
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("db")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    losses = train(args.db, args.steps)
    for i, loss in enumerate(losses):
        print(f"step {i:3d} loss {loss:.4f}")
    first, last = sum(losses[:5]) / len(losses[:5]), sum(losses[-5:]) / len(losses[-5:])
    print(f"mean loss of the first 5 steps {first:.3f}, of the last 5 {last:.3f}")
