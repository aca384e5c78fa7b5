"""Shared set-up for the benchmarks: an ImageNet-like sample tree and its list, made once."""

from __future__ import annotations

import resource
from pathlib import Path

from imgprep.lists import make_lists
from imgprep.sample import make_sample


def sample_tree(workdir: Path, images: int) -> tuple[Path, Path]:
    """(train root, train.txt) with `images` ImageNet-like JPEGs (about 500x375, q75-97)."""
    root = workdir / f"sample{images}"
    if not (root / "train").exists():
        make_sample(root, classes=20, train_per_class=images // 20, val_per_class=1, seed=1)
        make_lists(root, workdir / f"lists{images}", show_progress=False)
    return root / "train", workdir / f"lists{images}" / "train.txt"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def table(rows: list[tuple[str, float]], baseline: str, unit: str = "img/s") -> str:
    base = dict(rows)[baseline]
    lines = [f"| method | {unit} | x {baseline} |", "|---|---:|---:|"]
    lines += [f"| {name} | {value:,.0f} | {value / base:.2f} |" for name, value in rows]
    return "\n".join(lines)
