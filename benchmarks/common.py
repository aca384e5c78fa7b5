"""Shared set-up for the benchmarks: an ImageNet-like sample tree and its list, made once."""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from imgprep.lists import make_lists
from imgprep.sample import make_sample


GRAIN = 8.0  # ImageNet's file size and decoding cost (see imgprep.sample)


def sample_tree(workdir: Path, images: int) -> tuple[Path, Path]:
    """(train root, train.txt) with `images` ImageNet-like JPEGs (about 500x375, q75-97, ~100 KB)."""
    name = f"{images}-grain{GRAIN:g}"
    root = workdir / f"sample{name}"
    if not (root / "train").exists():
        make_sample(root, classes=20, train_per_class=images // 20, val_per_class=1, seed=1, grain=GRAIN)
        make_lists(root, workdir / f"lists{name}", show_progress=False)
    return root / "train", workdir / f"lists{name}" / "train.txt"


def describe_jpegs(root: Path) -> str:
    """'N JPEGs, mean W x H, K KB, S% 4:4:4' for the table's caption."""
    sizes, dims, full_chroma, count = 0, [], 0, 0
    for path in sorted(root.rglob("*.JPEG")):
        with Image.open(path) as img:
            dims.append(img.size)
            full_chroma += getattr(img, "layer", [(0, 1, 1)])[0][1:3] == (1, 1)
        sizes += path.stat().st_size
        count += 1
    w, h = (sum(d[i] for d in dims) / count for i in (0, 1))
    return f"{count} JPEGs, mean {w:.0f}x{h:.0f}, {sizes / count / 1024:.0f} KB, {100 * full_chroma / count:.0f}% 4:4:4"


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
