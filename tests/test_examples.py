import sys
from pathlib import Path

import pytest

from imgprep.build import BuildOptions, build_database
from imgprep.imageops import ImageSpec, parse_resize

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))


def test_tiny_network_learns_from_the_loader(sample_tree, tmp_path):
    pytest.importorskip("torch")
    from tiny_cpu_training import train

    options = BuildOptions(jobs=2, shuffle=True, spec=ImageSpec(parse_resize("shorter:256"), encoded=True))
    build_database(sample_tree.lists / "train.txt", sample_tree.root / "train", tmp_path / "db", options,
                   show_progress=False)
    losses = train(tmp_path / "db", steps=40, batch=32)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, losses
