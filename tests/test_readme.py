"""The README tells the truth: the files it names exist, and its quick start runs."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imgprep.formats.storage import Reader

REPO = Path(__file__).parents[1]
DOCS = [REPO / "README.md", REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
REPO_DIRS = ("benchmarks", "data", "docs", "examples", "imgprep", "scripts", "tests")
# A repository path: starts with one of the top folders and is not part of a longer path ($DATA/...,
# /data/...).
REPO_PATH = re.compile(rf"(?<![\w/.$-])((?:{'|'.join(REPO_DIRS)})/[\w./-]*)")
TEST_REF = re.compile(r"\b(test_\w+\.py)(?:::(test_\w+))?")
QUICKSTART = re.compile(r"<!-- quickstart\b[^>]*-->\s*```sh\n(.*?)```", re.S)


def code_spans(text: str) -> list[str]:
    """The text of every `code span` and fenced block."""
    blocks = re.findall(r"```[^\n]*\n(.*?)```", text, re.S)
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return blocks + spans


def named_paths(text: str) -> set[str]:
    found = set()
    for code in code_spans(text):
        found.update(m.rstrip(".") for m in REPO_PATH.findall(code))
        found.update(f"{name}.py" for name in re.findall(r"^([a-z_]+)\.py$", code))  # a module, as in Layout
    return found


def test_every_repository_path_the_docs_name_exists():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    basenames = {Path(p).name for p in tracked}
    missing = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        paths = named_paths(text)
        assert paths, doc  # the pattern still finds something
        for path in sorted(paths):
            if "/" in path:
                exists = (REPO / path).exists()
            else:
                exists = path in basenames
            if not exists:
                missing.append(f"{doc.name}: {path}")
        for module, test in TEST_REF.findall(text):
            source = REPO / "tests" / module
            if not source.exists():
                missing.append(f"{doc.name}: tests/{module}")
            elif test and not re.search(rf"^def {test}\(", source.read_text(encoding="utf-8"), re.M):
                missing.append(f"{doc.name}: tests/{module}::{test}")
    assert not missing, missing


def test_the_path_pattern_takes_repository_paths_only():
    text = ('`examples/train_resnet50.py x`, `"$DATA/train"`, `/data/ILSVRC2012/train`, `work/lists`,\n'
            "```sh\npython benchmarks/bench_build.py --images 2000\n```\n`lists.py`")
    assert named_paths(text) == {"examples/train_resnet50.py", "benchmarks/bench_build.py", "lists.py"}


def test_every_benchmark_table_follows_the_command_that_makes_it():
    text = (REPO / "benchmarks" / "README.md").read_text(encoding="utf-8")
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        if re.search(r"^\|---", section, re.M):
            before_table = section[:re.search(r"^\|", section, re.M).start()]
            assert "```sh\n" in before_table, section.splitlines()[0]


def quickstart_script() -> str:
    blocks = QUICKSTART.findall((REPO / "README.md").read_text(encoding="utf-8"))
    assert len(blocks) == 1, "README.md needs exactly one ```sh block after <!-- quickstart -->"
    return blocks[0]


def test_quick_start_runs_on_a_sample_shaped_like_the_download(tmp_path):
    """The block as written: it sets DOWNLOAD and WORK itself, makes the sample and prepares it."""
    pytest.importorskip("scipy")
    pytest.importorskip("torch")
    root = tmp_path / "checkout"  # the repository root as the block sees it: its examples, and room for build/
    root.mkdir()
    (root / "examples").symlink_to(REPO / "examples")
    bin_dir = tmp_path / "bin"  # `imgprep` and `python` as a user's venv has them, running this checkout
    bin_dir.mkdir()
    for name, command in (("imgprep", f'exec "{sys.executable}" -m imgprep "$@"'),
                          ("python", f'exec "{sys.executable}" "$@"')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{command}\n")
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    for name in ("DOWNLOAD", "WORK"):
        env.pop(name, None)
    script = "set -euo pipefail\n" + quickstart_script()
    result = subprocess.run(["bash", "-c", script], cwd=root, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"

    work = root / "build" / "imagenet"
    with Reader(work / "train_lmdb") as reader:
        assert len(reader) == 200  # imgprep sample's default: 10 classes of 20 train and 5 val images
    with Reader(work / "val_lmdb") as reader:
        assert len(reader) == 50
    assert (work / "mean224.binaryproto").stat().st_size > 224 * 224 * 3 * 4
    assert (work / "caffe_data_layers.prototxt").is_file() and f"{work.relative_to(root)} is ready" in result.stdout
    assert not list(root.rglob("*.JPEG"))  # nothing unpacked
    losses = [float(line.split()[-1]) for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(losses) == 20 and all(np.isfinite(losses)), result.stdout
    assert sum(losses[-5:]) < sum(losses[:5]), losses  # a model that learns
