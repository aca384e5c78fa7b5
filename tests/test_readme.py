"""The README tells the truth: the files it names exist, its quick start runs, and so does every example
after it."""

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
# A block the README marks runnable: `<!-- example -->` (or `<!-- example: ... -->`) before a sh or python block.
EXAMPLE = re.compile(r"<!-- example\b[^>]*-->\s*```(sh|python)\n(.*?)```", re.S)


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


def readme_examples() -> list[tuple[str, str]]:
    """The README's runnable examples, (language, code), in the order they appear."""
    return EXAMPLE.findall((REPO / "README.md").read_text(encoding="utf-8"))


class Checkout:
    """A folder shaped like the repository root as a user's shell sees it (the examples, room for
    build/), with `imgprep` and `python` on PATH running this checkout, as an activated .venv has them."""

    def __init__(self, folder: Path):
        self.root = folder / "checkout"
        self.root.mkdir()
        (self.root / "examples").symlink_to(REPO / "examples")
        bin_dir = folder / "bin"
        bin_dir.mkdir()
        for name, command in (("imgprep", f'exec "{sys.executable}" -m imgprep "$@"'),
                              ("python", f'exec "{sys.executable}" "$@"')):
            (bin_dir / name).write_text(f"#!/bin/sh\n{command}\n")
            (bin_dir / name).chmod(0o755)
        self.env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        for name in ("DOWNLOAD", "WORK"):
            self.env.pop(name, None)

    def run(self, language: str, code: str, timeout: float) -> subprocess.CompletedProcess:
        """Runs a sh block (in bash, stopping at the first failure) or a python block as written."""
        if language == "sh":
            command = ["bash", "-c", "set -euo pipefail\n" + code]
        else:
            command = ["python", "-c", code]
        return subprocess.run(command, cwd=self.root, env=self.env, capture_output=True, text=True,
                              timeout=timeout)


@pytest.fixture(scope="module")
def after_quickstart(tmp_path_factory):
    """A checkout in which the quick start block has run: the state every later example starts from."""
    pytest.importorskip("scipy")
    pytest.importorskip("torch")
    checkout = Checkout(tmp_path_factory.mktemp("readme"))
    checkout.quickstart = checkout.run("sh", quickstart_script(), timeout=300)
    return checkout


def test_quick_start_runs_on_a_sample_shaped_like_the_download(after_quickstart):
    """The block as written: it sets DOWNLOAD and WORK itself, makes the sample and prepares it."""
    root, result = after_quickstart.root, after_quickstart.quickstart
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


@pytest.mark.parametrize("index", range(len(readme_examples())))
def test_readme_example_runs(after_quickstart, index):
    """Each marked example, as written, after the quick start (a fresh shell or interpreter each,
    as a reader pastes them), exits 0 without a traceback."""
    assert after_quickstart.quickstart.returncode == 0, "the quick start failed: see its own test"
    language, code = readme_examples()[index]
    result = after_quickstart.run(language, code, timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stderr, \
        f"README example {index + 1} ({language}):\n{code}\n{result.stdout}\n{result.stderr}"


def test_the_readme_has_runnable_examples_of_every_command_and_the_python_api():
    from imgprep.cli import main

    examples = readme_examples()
    assert {language for language, _ in examples} == {"sh", "python"}, examples
    text = (REPO / "README.md").read_text(encoding="utf-8")
    shown = "\n".join(code for _, code in examples) + "\n" + "\n".join(code_spans(text))
    missing = [name for name in main.commands if not re.search(rf"\bimgprep {re.escape(name)}\b", shown)]
    assert not missing, f"commands without an example in README.md: {missing}"
    python = "\n".join(code for language, code in examples if language == "python")
    for name in ("Loader", "CaffeDataset", "prepare_data", "build_database", "compute_mean"):
        assert re.search(rf"\b{name}\(", python), f"no runnable README example calls {name}"
    statements = "\n".join(line.split("#")[0] for line in python.splitlines())  # comments may show DDP
    assert "DistributedSampler(" not in statements, \
        "a DistributedSampler needs a process group: the runnable examples must work in one process"
