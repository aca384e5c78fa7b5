"""Shared set-up for the benchmarks: an ImageNet-like sample tree and its list, made once."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from imgprep.prepare.make_lists import make_lists
from imgprep.prepare.sample import make_sample


GRAIN = 8.0  # ImageNet's file size and decoding cost (see imgprep.prepare.sample)


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


def caffe_tools() -> Path | None:
    """The folder of BVLC Caffe's convert_imageset / compute_image_mean named by IMGPREP_CAFFE_TOOLS
    (or its tools/ folder), else None (the benchmarks then leave Caffe's rows out, saying so)."""
    given = os.environ.get("IMGPREP_CAFFE_TOOLS")
    for folder in ([Path(given), Path(given) / "tools"] if given else []):
        if (folder / "convert_imageset").is_file() and (folder / "compute_image_mean").is_file():
            return folder
    return None


CAFFE_ENV = dict(os.environ, GLOG_minloglevel="2")  # Caffe's tools log every 1000 records otherwise; harmless to others


@dataclass
class Timing:
    """Runs of one command: wall seconds and CPU seconds (user + system of it and every process it
    waited for: workers, writer) per run, for `items` items each."""

    items: int
    walls: list = field(default_factory=list)
    cpus: list = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.items / statistics.median(self.walls)

    @property
    def rate_range(self) -> tuple[float, float]:
        return self.items / max(self.walls), self.items / min(self.walls)

    @property
    def cpu_ms(self) -> float:
        return 1000 * statistics.median(self.cpus) / self.items


def run_process(cmd, env=None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process and its waited-for descendants) of one run."""
    start = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{stderr.decode(errors='replace')[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime


def interleaved(commands: dict, items: int, runs: int, prepare=lambda name: None, warmup: bool = True) -> dict:
    """{name: Timing}: each command once as a warm-up, then `runs` rounds, every command once per round,
    so a load that comes and goes falls on all of them alike. `prepare(name)` runs before each run."""
    timings = {name: Timing(items) for name in commands}
    for round_ in range(runs + warmup):
        for name, cmd in commands.items():
            prepare(name)
            wall, cpu = run_process(cmd, CAFFE_ENV)
            if round_ or not warmup:
                timings[name].walls.append(wall)
                timings[name].cpus.append(cpu)
    return timings


def timing_table(timings: dict, baseline: str, unit: str = "img/s") -> str:
    """Median rate, its range over the runs, the ratio to `baseline` and CPU per item, side by side."""
    base = timings[baseline]
    lines = [f"| method | {unit} (median) | range | x {baseline} | CPU ms per item | CPU x {baseline} |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, t in timings.items():
        low, high = t.rate_range
        lines.append(f"| {name} | {t.rate:,.0f} | {low:,.0f}-{high:,.0f} | {t.rate / base.rate:.2f} | "
                     f"{t.cpu_ms:.3f} | {t.cpu_ms / base.cpu_ms:.2f} |")
    return "\n".join(lines)
