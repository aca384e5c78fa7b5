"""Faults tried for real: file-size limits, a full disk, a read-only disk, two writers, a reader
during a build, Ctrl-C in every long command."""

import json
import os
import resource
import signal
import subprocess

import pytest

from conftest import IMGPREP, assert_clean_error, db_records, run_cli, tmpfs, wait_for_progress
from imgprep import ImgprepError
from imgprep.formats.manifest import MANIFEST
from imgprep.loading.loader import Loader

BUILD = ["--resize", "squash:128x128", "--raw", "--jobs", "1"]


def build_cmd(tree, out, *extra):
    return [*IMGPREP, "build-lmdb", str(tree.lists / "train.txt"), str(tree.root / "train"), str(out), *BUILD, *extra]


@pytest.fixture(scope="module")
def reference(larger_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "reference"
    assert subprocess.run(build_cmd(larger_tree, out), capture_output=True).returncode == 3
    return db_records(out)


def test_file_size_limit_is_a_clear_error_and_resumable(larger_tree, reference, tmp_path):
    limit = 4 << 20

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "db"
    result = subprocess.run(build_cmd(larger_tree, out), capture_output=True, text=True, preexec_fn=cap)
    assert_clean_error(result, "file-size limit")
    assert json.loads((out / MANIFEST).read_text())["state"] == "building"
    resumed = subprocess.run(build_cmd(larger_tree, out, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 3, resumed.stderr
    assert db_records(out) == reference


def test_full_disk_is_a_clear_error_and_resumable(larger_tree, reference, tmp_path):
    with tmpfs(tmp_path / "small", "size=6m") as disk:
        result = subprocess.run(build_cmd(larger_tree, disk / "db"), capture_output=True, text=True)
        assert_clean_error(result, "disk is full", "--resume")
        subprocess.run(["mount", "-o", "remount,size=200m", str(disk)], check=True)
        resumed = subprocess.run(build_cmd(larger_tree, disk / "db", "--resume"), capture_output=True, text=True)
        assert resumed.returncode == 3, resumed.stderr
        assert db_records(disk / "db") == reference


def test_a_merge_on_a_full_disk_says_to_run_the_same_merge_and_that_finishes_it(larger_tree, reference, tmp_path):
    parts = [tmp_path / f"part{i}" for i in range(2)]
    for i, part in enumerate(parts):
        built = subprocess.run(build_cmd(larger_tree, part, "--num-shards", "2", "--shard-index", str(i)),
                               capture_output=True, text=True)
        assert built.returncode in (0, 3), built.stderr  # 3: some of the tree's odd files fell in this part
    merge = [*IMGPREP, "merge", *map(str, parts)]
    with tmpfs(tmp_path / "small", "size=6m") as disk:
        result = subprocess.run([*merge, str(disk / "db")], capture_output=True, text=True)
        assert_clean_error(result, "disk is full", "run the same merge command again")
        assert "--resume" not in result.stderr  # build-lmdb --resume refuses a merge's output
        subprocess.run(["mount", "-o", "remount,size=200m", str(disk)], check=True)
        again = subprocess.run([*merge, str(disk / "db")], capture_output=True, text=True)
        assert again.returncode == 0, again.stderr
        assert db_records(disk / "db") == reference


def test_read_only_output_is_a_clear_error(sample_tree, tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as disk:
        result = run_cli("build-lmdb", sample_tree.lists / "train.txt", sample_tree.root / "train", disk / "db",
                         check=False)
        assert_clean_error(result, "Read-only file system")
        result = run_cli("resize", sample_tree.root / "val", disk / "out", check=False)
        assert_clean_error(result, "Read-only file system")


def _slow_build(tree, out, *extra):
    env = dict(os.environ, IMGPREP_PROGRESS_INTERVAL="0")
    return subprocess.Popen(build_cmd(tree, out, "--txn-size", "10", *extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)


@pytest.mark.parametrize("backend", ["lmdb", "leveldb"])
def test_second_writer_is_refused_and_readers_see_a_partial_build(larger_tree, reference, tmp_path, backend):
    out = tmp_path / "db"
    proc = _slow_build(larger_tree, out, "--backend", backend)
    try:
        assert wait_for_progress(proc, 100)
        proc.send_signal(signal.SIGSTOP)  # paused mid-build: it holds its locks, the database is partial
        second = subprocess.run(build_cmd(larger_tree, out, "--backend", backend, "--resume"), capture_output=True,
                                text=True)
        assert_clean_error(second, "being written by another imgprep process")
        overwrite = subprocess.run(build_cmd(larger_tree, out, "--backend", backend, "--overwrite"),
                                   capture_output=True, text=True)
        assert_clean_error(overwrite, "being written by another imgprep process")
        if backend == "lmdb":  # LMDB readers work beside the writer; a partial build needs --allow-partial
            assert_clean_error(run_cli("inspect", out, check=False), "incomplete build", "--resume",
                               "--allow-partial")
            seen = run_cli("inspect", out, "--verify", "--allow-partial", check=False)
            assert seen.returncode == 0 and "not complete" in seen.stdout
            with pytest.raises(ImgprepError, match="incomplete build"):
                Loader(out, device="cpu")
        else:  # LevelDB is one process at a time: a clear refusal
            assert_clean_error(run_cli("inspect", out, "--allow-partial", check=False),
                               "another process has the database open")
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.stderr.read()
        proc.wait()
    assert proc.returncode == 3
    assert db_records(out) == reference


@pytest.mark.parametrize("command", ["resize", "compute-mean"])
def test_ctrl_c_in_other_long_commands(larger_tree, tmp_path, command):
    if command == "resize":
        args = ["resize", str(larger_tree.root / "train"), str(tmp_path / "out"), "--jobs", "1"]
    else:
        db = tmp_path / "db"
        subprocess.run(build_cmd(larger_tree, db), capture_output=True)
        args = ["compute-mean", str(db), str(tmp_path / "m.binaryproto"), "--jobs", "1"]
    env = dict(os.environ, IMGPREP_PROGRESS_INTERVAL="0")
    proc = subprocess.Popen([*IMGPREP, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    wait_for_progress(proc, 1, stage=command.encode())
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate()
    if proc.returncode == 0:
        pytest.skip("finished before Ctrl-C arrived")
    assert proc.returncode == 130 and b"Traceback" not in err and b"run the same command again" in err, err


def test_non_utf8_file_names_are_built_under_their_bytes(sample_tree, tmp_path):
    root = tmp_path / "root"
    os.makedirs(root / "n01440764")
    name = b"n01440764/caf\xe9 \xff.JPEG"
    source = (sample_tree.root / "val" / "ILSVRC2012_val_00000001.JPEG").read_bytes()
    with open(os.fsencode(root) + b"/" + name, "wb") as f:
        f.write(source)
    (tmp_path / "list.txt").write_bytes(name + b" 0\n")
    run_cli("build-lmdb", tmp_path / "list.txt", root, tmp_path / "db")
    assert [k for k, _ in db_records(tmp_path / "db")] == [b"00000000_" + name]
