import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from imgprep.prepare.make_lists import make_lists
from imgprep.prepare.sample import make_sample

IMGPREP = [sys.executable, "-m", "imgprep"]


@pytest.fixture(scope="session", autouse=True)
def cache_folder(tmp_path_factory):
    """imgprep's cache (archive indexes) in the pytest run's temporary folder, not the user's ~/.cache;
    subprocesses inherit it."""
    folder = tmp_path_factory.mktemp("cache")
    os.environ["XDG_CACHE_HOME"] = str(folder)
    return folder / "imgprep"


@pytest.fixture(scope="session")
def sample_tree(tmp_path_factory):
    """A 10-class sample with every oddity, and its lists; shared read-only by the tests."""
    root = tmp_path_factory.mktemp("sample") / "ilsvrc"
    sample = make_sample(root, classes=10, train_per_class=12, val_per_class=3, seed=7, oddities=True)
    lists = root.parent / "lists"
    make_lists(root, lists, show_progress=False)
    sample.lists = lists
    return sample


@pytest.fixture
def tree_copy(sample_tree, tmp_path):
    """A private, writable copy of the sample tree (for tests that damage it)."""
    root = tmp_path / "ilsvrc"
    shutil.copytree(sample_tree.root, root)
    return root


@contextmanager
def tmpfs(path, options):
    """A tmpfs of `options` (size=6m: a small disk) mounted at `path` while in the block; skips without root."""
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)])


def run_cli(*args, check=True, **kwargs):
    """Runs `python -m imgprep ARGS` as a user would; returns the CompletedProcess."""
    result = subprocess.run([*IMGPREP, *map(str, args)], capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"imgprep {args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def db_records(path):
    """Every (key, value) of a database, in key order."""
    from imgprep.formats.storage import Reader

    with Reader(path) as reader:
        return list(reader.items())


def wait_for_progress(proc, done, stage=b"build-lmdb"):
    """Reads a child's progress lines (IMGPREP_PROGRESS_INTERVAL=0) until it reports `done` items."""
    for line in proc.stderr:
        if line.startswith(stage + b": ") and b"/" in line.split()[1]:
            if int(line.split()[1].split(b"/")[0].replace(b",", b"")) >= done:
                return True
    return False


def loky_workers(pid: int) -> list[int]:
    """The pids of a build's worker processes: its children forked from it (same command line; the
    resource tracker is another one)."""
    own = Path(f"/proc/{pid}/cmdline").read_bytes()
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if Path(f"/proc/{c}/cmdline").read_bytes() == own]


def assert_clean_error(result, *fragments):
    """A user-facing failure: non-zero exit, an `Error:` line naming the problem, no traceback."""
    assert result.returncode not in (0,), result
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


@pytest.fixture(scope="session")
def larger_tree(tmp_path_factory):
    """600 images: long enough (a few seconds) for a kill to land mid-build."""
    root = tmp_path_factory.mktemp("larger") / "ilsvrc"
    tree = make_sample(root, classes=10, train_per_class=60, val_per_class=1, seed=3, oddities=True)
    tree.lists = root.parent / "lists"
    make_lists(root, tree.lists, show_progress=False)
    return tree


def index_labelled_dbs(sample_tree, base, kinds, limit=None, jobs=2, seed=11):
    """Databases of the sample's plain train images (oddities left out), each labelled with its
    entry's index in the list, so a label names its record. `kinds`: (name, resize, encoded, backend).
    Returns {name: path, "count": N, "sources": {label: source image path}}."""
    from imgprep.prepare.build import BuildOptions, build_database
    from imgprep.formats.imageops import ImageSpec
    from imgprep.formats.resizing import parse_resize

    entries = [line.rsplit(" ", 1)[0] for line in (sample_tree.lists / "train.txt").read_text().splitlines()]
    good = [p for p in entries if p not in sample_tree.oddities][:limit]
    listing = base / "index-labelled.txt"
    listing.write_text("".join(f"{p} {i}\n" for i, p in enumerate(good)))
    made = {"count": len(good), "sources": {i: sample_tree.root / "train" / p for i, p in enumerate(good)}}
    for name, resize, encoded, backend in kinds:
        options = BuildOptions(backend=backend, jobs=jobs, shuffle=True, seed=seed,
                               spec=ImageSpec(parse_resize(resize), encoded=encoded, quality=95))
        build_database(listing, sample_tree.root / "train", base / name, options, show_progress=False)
        made[name] = base / name
    return made


@contextmanager
def folder_alias(folder, alias, kind):
    """`alias` made a second name of `folder`: a "bind mount" (what a second NFS mount of one export
    looks like; it needs root, so the test skips, saying so, where mounting is not allowed) or a
    "symbolic link"."""
    if kind == "symbolic link":
        alias.symlink_to(folder)
        yield alias
        return
    alias.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(folder), str(alias)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"mount --bind is not allowed here (it needs root): {mounted.stderr.strip()}")
    try:
        yield alias
    finally:
        subprocess.run(["umount", "-l", str(alias)], check=True)
