"""A few SGD steps of a tiny CNN on CPU, fed by the imgprep DALI loader (DALI's CPU mode).

    python examples/tiny_cpu_training.py build/demo/train_lmdb --steps 30

Prints the loss per step; used by the tests to see the loss fall. Needs only torch.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from imgprep.loader import Loader


def tiny_net(num_classes: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.AvgPool2d(4),  # 224 -> 56: the classes of the sample differ in colour and texture
        torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, num_classes))


def train(db, steps: int = 30, batch: int = 32, lr: float = 0.05, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    losses = []
    with Loader(db, batch_size=batch, train=True, device="cpu", output="torch", seed=seed) as loader:
        model = tiny_net(1000)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        while len(losses) < steps:
            for images, labels in loader:
                loss = F.cross_entropy(model(images), labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                if len(losses) == steps:
                    break
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("db")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    for i, loss in enumerate(train(args.db, args.steps)):
        print(f"step {i:3d} loss {loss:.4f}")
