import sys
from pathlib import Path

import pytest

from imgprep.prepare.build import BuildOptions, build_database
from imgprep.formats.imageops import ImageSpec
from imgprep.formats.resizing import parse_resize

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))


def test_tiny_network_learns_from_the_loader(sample_tree, tmp_path):
    pytest.importorskip("torch")
    import math

    from tiny_cpu_training import database_labels, train

    options = BuildOptions(jobs=2, shuffle=True, spec=ImageSpec(parse_resize("shorter:256"), encoded=True))
    build_database(sample_tree.lists / "train.txt", sample_tree.root / "train", tmp_path / "db", options,
                   show_progress=False)
    present = sorted({int(line.split()[-1]) for line in (sample_tree.lists / "train.txt").read_text().splitlines()})
    assert database_labels(tmp_path / "db") == present and len(present) == 10
    losses = train(tmp_path / "db", steps=40, batch=32)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert abs(losses[0] - math.log(10)) < 0.3, losses  # a head of the 10 classes present, not of 1000
    assert last < 0.6 * first and max(losses) < 1.05 * losses[0], losses  # falls, without jumping up


def test_train_resnet50_evaluates_center_and_ten_crop_per_image(sample_tree, tmp_path):
    """The example's `evaluate` against numpy: ten-crop averages the softmax of an image's ten views;
    padding (label -1) is skipped."""
    torch = pytest.importorskip("torch")
    import numpy as np
    from imgprep.loading.loader import Loader
    from train_resnet50 import evaluate

    options = BuildOptions(jobs=1, spec=ImageSpec(parse_resize("shorter:256"), encoded=True))
    build_database(sample_tree.lists / "val.txt", sample_tree.root / "val", tmp_path / "db", options,
                   show_progress=False)
    weights = torch.from_numpy(np.random.default_rng(0).normal(0, 3, (3, 1000)).astype(np.float32))
    present = sorted({int(line.split()[-1]) for line in (sample_tree.lists / "val.txt").read_text().splitlines()})
    bias = torch.full((1000,), -100.0)
    bias[present] = 0.0  # the sample's ten classes compete, so top-5 hits some and misses some

    class Linear(torch.nn.Module):  # logits from the channel means: views of one image differ
        def forward(self, x):
            return x.mean(dim=(2, 3)) @ weights + bias

    def reference(images, labels):
        images, labels = images.numpy(), labels.numpy()
        views = images if images.ndim == 5 else images[:, None]
        logits = views.mean(axis=(3, 4)) @ weights.numpy() + bias.numpy()
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p = (p / p.sum(-1, keepdims=True)).mean(1)
        top5 = np.argsort(-p, axis=1)[:, :5]
        real = labels >= 0
        return (top5[real, 0] == labels[real]).sum(), (top5[real] == labels[real, None]).any(1).sum(), real.sum()

    for mode in ("center", "ten-crop"):
        with Loader(tmp_path / "db", batch_size=4, train=False, policy=mode, output="torch", device="cpu",
                    num_shards=4, shard_id=1) as loader:
            got = evaluate(Linear(), loader, torch.device("cpu"))
            counts = np.sum([reference(images, labels) for images, labels in loader], axis=0)
        assert got == pytest.approx((counts[0] / counts[2], counts[1] / counts[2]))
        assert 0 < counts[1] < counts[2]


def test_train_resnet50_steps_run_as_many_epochs_as_they_take(sample_tree, tmp_path):
    """--steps 20 on a database of 8 batches an epoch runs epochs 0, 1 and 2 (8 + 8 + 4 steps), whatever
    --epochs says, and a run resumed at step 11 makes the remaining 9 steps from the loader's position."""
    pytest.importorskip("torch")
    from imgprep.loading.loader import Loader
    from train_resnet50 import train_loop

    options = BuildOptions(jobs=1, spec=ImageSpec(parse_resize("shorter:256"), encoded=True))
    build_database(sample_tree.lists / "val.txt", sample_tree.root / "val", tmp_path / "db", options,
                   show_progress=False)
    with Loader(tmp_path / "db", batch_size=4, train=True, device="cpu", num_threads=1) as loader:
        batches = len(loader)
        steps, epochs = [], []
        made = train_loop(loader, 1, 2 * batches + batches // 2, lambda images, labels, step, rate, epoch:
                          steps.append((epoch, step)), lambda epoch, seen, seconds: epochs.append((epoch, seen)))
        assert made == 2 * batches + batches // 2 == len(steps)
        assert [s for _, s in steps] == list(range(1, made + 1))
        assert [e for e, _ in epochs] == [0, 1, 2] and epochs[0][1] == loader.epoch_size
        assert [e for e, _ in steps] == [0] * batches + [1] * batches + [2] * (batches // 2)
        assert train_loop(loader, 1, 0, lambda *a: None, lambda *a: None) == 0  # past --epochs: nothing more

    with Loader(tmp_path / "db", batch_size=4, train=True, device="cpu", num_threads=1) as loader:
        done = []
        train_loop(loader, 1, batches + 3, lambda images, labels, step, rate, epoch: done.append(labels.tolist()),
                   lambda *a: None)
        state = loader.state_dict()
    with Loader(tmp_path / "db", batch_size=4, train=True, device="cpu", num_threads=1) as loader:
        loader.load_state_dict(state)
        rest = []
        made = train_loop(loader, 1, 2 * batches, lambda images, labels, step, rate, epoch: rest.append((epoch, step)),
                          lambda *a: None, step=batches + 3)
        assert made == 2 * batches and rest[0] == (1, batches + 4) and len(rest) == batches - 3
