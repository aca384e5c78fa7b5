"""Shared set-up for the benchmarks: an ImageNet-like sample tree and its list, made once."""

from __future__ import annotations

import argparse
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


def standard_args(doc: str, **extra) -> argparse.Namespace:
    """--images and --workdir (created), plus `extra` as name=(type, default, help)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="ImageNet-like JPEGs to make")
    parser.add_argument("--workdir", type=Path, default=Path("build/bench"))
    for name, (type_, default, help_) in extra.items():
        parser.add_argument(f"--{name}", type=type_, default=default, help=help_)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    return args


def table(rows: list[tuple[str, float]], baseline: str, unit: str = "img/s") -> str:
    base = dict(rows)[baseline]
    lines = [f"| method | {unit} | x {baseline} |", "|---|---:|---:|"]
    lines += [f"| {name} | {value:,.0f} | {value / base:.2f} |" for name, value in rows]
    return "\n".join(lines)
