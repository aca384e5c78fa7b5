import fcntl
import json
import os
import signal
import subprocess
import time

import pytest

from conftest import IMGPREP, assert_clean_error, db_records, folder_alias, run_cli
from imgprep import ImgprepError
from imgprep.prepare.build import BuildOptions, build_database
from imgprep.formats.manifest import MANIFEST
from imgprep.formats.manifest import FAILURES
from imgprep.formats.imageops import ImageSpec
from imgprep.formats.resizing import parse_resize
from imgprep.prepare.mean import MeanTransform, combine, compute_mean
from imgprep.prepare.merge import merge_parts


def build(sample_tree, out, backend, **kwargs):
    options = BuildOptions(backend=backend, jobs=2, shuffle=True, seed=4,
                           spec=ImageSpec(parse_resize("shorter:96"), encoded=True), **kwargs)
    return build_database(sample_tree.lists / "train.txt", sample_tree.root / "train", out, options,
                          show_progress=False)


@pytest.mark.parametrize("backend", ["lmdb", "leveldb"])
def test_shards_merged_equal_a_single_build(sample_tree, tmp_path, backend):
    build(sample_tree, tmp_path / "single", backend)
    parts = [tmp_path / f"part{i}" for i in range(3)]
    for i, part in enumerate(parts):
        build(sample_tree, part, backend, num_shards=3, shard_index=i)
    merge_parts(list(reversed(parts)), tmp_path / "merged", show_progress=False)
    assert db_records(tmp_path / "merged") == db_records(tmp_path / "single")
    assert (tmp_path / "merged" / FAILURES).read_text() == (tmp_path / "single" / FAILURES).read_text()
    merged = json.loads((tmp_path / "merged" / MANIFEST).read_text())
    single = json.loads((tmp_path / "single" / MANIFEST).read_text())
    assert merged["identity"] == single["identity"] and merged["records"] == single["records"]
    # the parts' integer sums combine into exactly the merged database's mean
    transform = MeanTransform(crop=96)
    by_parts = combine([compute_mean(p, transform, show_progress=False) for p in parts])
    whole = compute_mean(tmp_path / "merged", transform, show_progress=False)
    assert (by_parts.sums == whole.sums).all() and by_parts.count == whole.count
    inspected = run_cli("inspect", tmp_path / "merged", "--list", sample_tree.lists / "train.txt", check=False)
    assert "mislabeled" not in inspected.stdout and "extra" not in inspected.stdout


def test_merge_refuses_incomplete_or_mismatched_parts(sample_tree, tmp_path):
    parts = [tmp_path / f"part{i}" for i in range(2)]
    for i, part in enumerate(parts):
        build(sample_tree, part, "lmdb", num_shards=2, shard_index=i)
    with pytest.raises(ImgprepError, match=r"expected parts 0..1"):
        merge_parts(parts[:1], tmp_path / "m", show_progress=False)
    other = tmp_path / "other"
    options = BuildOptions(jobs=2, num_shards=2, shard_index=1, spec=ImageSpec(parse_resize("shorter:64")))
    build_database(sample_tree.lists / "train.txt", sample_tree.root / "train", other, options, show_progress=False)
    assert_clean_error(run_cli("merge", parts[0], other, tmp_path / "m", check=False), "other options", "resize")
    manifest = json.loads((parts[1] / MANIFEST).read_text())
    manifest["state"] = "building"
    (parts[1] / MANIFEST).write_text(json.dumps(manifest))
    assert_clean_error(run_cli("merge", *parts, tmp_path / "m", check=False), "incomplete build", "--resume",
                       "--allow-partial")
    partial = run_cli("merge", *parts, tmp_path / "m", "--allow-partial", check=False)
    assert partial.returncode == 0 and json.loads((tmp_path / "m" / MANIFEST).read_text())["state"] == "partial"


def test_merge_refuses_a_repeated_part_or_an_output_inside_a_part_before_touching_anything(sample_tree, tmp_path):
    parts = [tmp_path / f"part{i}" for i in range(3)]
    for i, part in enumerate(parts):
        build(sample_tree, part, "lmdb", num_shards=3, shard_index=i)
    before = [db_records(p) for p in parts]
    assert_clean_error(run_cli("merge", *parts, parts[2], tmp_path / "m", "--overwrite", check=False), "given twice")
    assert_clean_error(run_cli("merge", *parts, parts[2], "--overwrite", check=False), "is the part")
    assert_clean_error(run_cli("merge", *parts, parts[1] / "sub", check=False), "lies inside the part")
    assert [db_records(p) for p in parts] == before and not (tmp_path / "m").exists()


def test_a_merge_that_stopped_is_redone_by_the_same_command(sample_tree, tmp_path):
    parts = [tmp_path / f"part{i}" for i in range(2)]
    for i, part in enumerate(parts):
        build(sample_tree, part, "lmdb", num_shards=2, shard_index=i)
    run_cli("merge", *parts, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / MANIFEST).read_text())
    (tmp_path / "m" / MANIFEST).write_text(json.dumps(dict(manifest, state="building")))  # as Ctrl-C leaves it
    run_cli("merge", *parts, tmp_path / "m")
    assert json.loads((tmp_path / "m" / MANIFEST).read_text())["state"] == "complete"
    assert_clean_error(run_cli("merge", *parts, tmp_path / "m", check=False), "--overwrite")


def _full_pipe():
    """A pipe whose 4 KiB buffer is already full: a process writing to it blocks until killed."""
    read, write = os.pipe()
    fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, 4096)
    os.set_blocking(write, False)
    try:
        while True:
            os.write(write, b"x" * 4096)
    except BlockingIOError:
        pass
    os.set_blocking(write, True)
    return read, write


def test_a_merge_stopped_by_sigterm_is_finished_by_merge_and_refused_by_build_lmdb_resume(sample_tree, tmp_path):
    build(sample_tree, tmp_path / "single", "lmdb")
    parts = [tmp_path / f"part{i}" for i in range(3)]
    for i, part in enumerate(parts):
        build(sample_tree, part, "lmdb", num_shards=3, shard_index=i)
    out = tmp_path / "merged"
    # merge prints its first progress line once the first part is copied: into a full pipe, where it waits
    read, write = _full_pipe()
    proc = subprocess.Popen([*IMGPREP, "merge", *map(str, parts), str(out)], stdout=subprocess.DEVNULL, stderr=write,
                            env=dict(os.environ, IMGPREP_PROGRESS_INTERVAL="0"))
    os.close(write)
    try:
        first = len(db_records(parts[0]))
        deadline = time.monotonic() + 120
        while not ((out / "data.mdb").exists() and len(db_records(out)) >= first):
            assert proc.poll() is None and time.monotonic() < deadline, "merge did not stop after the first part"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == -signal.SIGTERM
    finally:
        proc.kill()
        os.close(read)
    stopped = db_records(out)
    assert json.loads((out / MANIFEST).read_text())["state"] == "building"
    assert len(stopped) == first < len(db_records(tmp_path / "single"))

    # every hint names merge, none build-lmdb --resume
    for command in (["inspect", out], ["compute-mean", out, tmp_path / "mean.binaryproto"]):
        result = run_cli(*command, check=False)
        assert_clean_error(result, "a merge that stopped", "the same merge command", "--allow-partial")
        assert "build-lmdb" not in result.stderr
    from imgprep.loading.loader import Loader
    with pytest.raises(ImgprepError, match="the same merge command"):
        Loader(out, device="cpu")
    # build-lmdb --resume with the very options of the build refuses it, and changes nothing
    resumed = run_cli("build-lmdb", sample_tree.lists / "train.txt", sample_tree.root / "train", out,
                      "--resize", "shorter:96", "--encoded", "--shuffle", "--seed", "4", "--jobs", "2", "--resume",
                      check=False)
    assert_clean_error(resumed, "output of `imgprep merge`", "the same merge command")
    assert db_records(out) == stopped and json.loads((out / MANIFEST).read_text())["state"] == "building"

    run_cli("merge", *parts, out)
    assert db_records(out) == db_records(tmp_path / "single")
    assert (out / FAILURES).read_text() == (tmp_path / "single" / FAILURES).read_text()
    merged = json.loads((out / MANIFEST).read_text())
    single = json.loads((tmp_path / "single" / MANIFEST).read_text())
    assert merged["state"] == "complete"
    assert (merged["records"], merged["failures"], merged["failure_reasons"]) == \
        (single["records"], single["failures"], single["failure_reasons"])
    assert_clean_error(run_cli("build-lmdb", sample_tree.lists / "train.txt", sample_tree.root / "train", out,
                               "--resume", check=False), "output of `imgprep merge`")


@pytest.mark.parametrize("kind", ["bind mount", "symbolic link"])
def test_merge_knows_a_part_under_another_name(sample_tree, tmp_path, kind):
    parts = [tmp_path / f"part{i}" for i in range(2)]
    for i, part in enumerate(parts):
        build(sample_tree, part, "lmdb", num_shards=2, shard_index=i)
    before = [db_records(p) for p in parts]
    with folder_alias(parts[0], tmp_path / "alias", kind) as alias:
        assert_clean_error(run_cli("merge", *parts, alias, "--overwrite", check=False), "is the part")
        assert_clean_error(run_cli("merge", *parts, alias / "sub", check=False), "lies inside the part")
        assert_clean_error(run_cli("merge", parts[0], alias, parts[1], tmp_path / "m", check=False), "given twice")
    assert [db_records(p) for p in parts] == before and not (tmp_path / "m").exists()


def test_a_fifo_among_a_parts_files_is_refused_not_waited_on(sample_tree, tmp_path):
    parts = [tmp_path / f"part{i}" for i in range(2)]
    for i, part in enumerate(parts):
        build(sample_tree, part, "lmdb", num_shards=2, shard_index=i)
    for name in ("data.mdb", FAILURES):
        os.rename(parts[1] / name, parts[1] / (name + ".kept"))
        os.mkfifo(parts[1] / name)
        result = run_cli("merge", *parts, tmp_path / "m", check=False, timeout=60)
        assert_clean_error(result, f"{parts[1] / name} is a FIFO, not a regular file")
        os.unlink(parts[1] / name)
        os.rename(parts[1] / (name + ".kept"), parts[1] / name)
    assert not (tmp_path / "m").exists()
