"""What imgprep may delete and write in an output folder, and what makes up a build's identity."""

import json
import os
import shutil

import pytest

from conftest import assert_clean_error, db_records, run_cli
from imgprep.prepare.build import BuildOptions, build_database
from imgprep.formats.manifest import MANIFEST
from imgprep.formats.manifest import FAILURES, read_failures
from imgprep.formats.manifest import LOCK, database_kind, record_count
from imgprep.formats.storage import Reader, open_writer

TINY = ["--resize", "squash:8x8", "--raw", "--jobs", "1"]


def cli_build(tree, out, *extra, list_file=None, root=None, **kwargs):
    return run_cli("build-lmdb", list_file or tree.lists / "train.txt", root or tree.root / "train", out,
                   *TINY, *extra, check=False, **kwargs)


def make_partial(tree, out, *extra):
    """A build stopped half-way, as kill -9 leaves it (state 'building', some records)."""
    assert cli_build(tree, out, *extra).returncode == 3
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["state"] = "building"
    (out / MANIFEST).write_text(json.dumps(manifest))


def test_overwrite_deletes_only_database_files_recognised_by_structure(sample_tree, tmp_path):
    fake = tmp_path / "fake"  # named like LevelDB / LMDB files, but not databases
    fake.mkdir()
    (fake / "CURRENT").write_text("v1\n")
    (fake / "data.csv").write_text("x\n")
    assert_clean_error(cli_build(sample_tree, fake, "--overwrite"), "neither a database nor an imgprep build")
    (fake / "data.mdb").write_text("not lmdb")
    assert_clean_error(cli_build(sample_tree, fake, "--overwrite"), "neither a database nor an imgprep build")
    assert sorted(os.listdir(fake)) == ["CURRENT", "data.csv", "data.mdb"]  # not even a lock left behind

    caffe_made = tmp_path / "caffe_made"  # a real LMDB without a manifest, beside a user's file
    writer = open_writer(caffe_made, "lmdb")
    writer.put_batch([(b"00000000_a", b"x")])
    writer.close()
    (caffe_made / "notes.txt").write_text("mine")
    assert cli_build(sample_tree, caffe_made, "--overwrite").returncode == 3
    assert (caffe_made / "notes.txt").read_text() == "mine" and len(db_records(caffe_made)) > 100

    out = tmp_path / "db"  # an imgprep build, then the user keeps its LIST and notes beside it
    assert cli_build(sample_tree, out).returncode == 3
    list_file = out / "train.txt"
    shutil.copy(sample_tree.lists / "train.txt", list_file)
    (out / "notes.txt").write_text("mine")
    result = cli_build(sample_tree, out, "--overwrite", "--backend", "leveldb", list_file=list_file)
    assert result.returncode == 3, result.stderr
    assert list_file.read_bytes() == (sample_tree.lists / "train.txt").read_bytes()
    assert (out / "notes.txt").read_text() == "mine" and database_kind(out) == "leveldb"
    assert not (out / "data.mdb").exists()  # the LMDB it replaced is gone
    result = cli_build(sample_tree, out, "--overwrite", list_file=list_file)  # LevelDB -> LMDB
    assert result.returncode == 3 and list_file.exists() and not (out / "CURRENT").exists()


def test_symlinks_in_out_are_never_written_through(sample_tree, tmp_path):
    out = tmp_path / "db"
    make_partial(sample_tree, out)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / FAILURES).unlink()
    os.symlink(victim, out / FAILURES)
    assert_clean_error(cli_build(sample_tree, out, "--resume"), "symbolic link")
    assert_clean_error(cli_build(sample_tree, out, "--overwrite"), "symbolic link")
    assert victim.read_text() == "precious"

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    os.symlink(victim, fresh / LOCK)
    assert_clean_error(cli_build(sample_tree, fresh), "symbolic link")
    assert victim.read_text() == "precious"


def test_resume_needs_the_same_root_and_list(sample_tree, tmp_path):
    out = tmp_path / "db"
    make_partial(sample_tree, out)
    other_root = tmp_path / "other_root"
    shutil.copytree(sample_tree.root / "train", other_root)
    assert_clean_error(cli_build(sample_tree, out, "--resume", root=other_root), "differ", "root")
    same_root_by_link = tmp_path / "link_root"
    os.symlink(sample_tree.root / "train", same_root_by_link)  # ROOT counts resolved
    assert cli_build(sample_tree, out, "--resume", root=same_root_by_link).returncode == 3

    piped = run_cli("build-lmdb", "/dev/stdin", sample_tree.root / "train", tmp_path / "piped", *TINY,
                    input=(sample_tree.lists / "train.txt").read_text(), check=False)
    assert_clean_error(piped, "not a regular file", "cmd > list.txt")
    assert not (tmp_path / "piped").exists()


def test_an_older_manifest_without_an_order_fingerprint_is_not_resumed(sample_tree, tmp_path):
    out = tmp_path / "db"
    make_partial(sample_tree, out, "--shuffle")
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["format"] = "imgprep-build/1"
    for key in ("order", "order_sha256", "root"):
        del manifest["identity"][key]
    (out / MANIFEST).write_text(json.dumps(manifest))
    assert_clean_error(cli_build(sample_tree, out, "--shuffle", "--resume"), "older imgprep", "--overwrite")


def test_bad_shard_arguments_create_nothing_and_a_lone_lock_is_imgpreps(sample_tree, tmp_path):
    out = tmp_path / "db"
    assert_clean_error(cli_build(sample_tree, out, "--num-shards", "2", "--shard-index", "5"),
                       "--shard-index must be in 0..1")
    assert not out.exists()
    out.mkdir()
    (out / LOCK).touch()  # what a run stopped before its first write leaves
    assert cli_build(sample_tree, out).returncode == 3


@pytest.mark.parametrize("text", ['{"state": "complete"}', "[1, 2]", '{"format": "imgprep-build/2", '
                                  '"state": "building", "identity": {"backend": "lmdb", "num_shards": 1}}'])
def test_a_manifest_of_the_wrong_shape_is_a_clear_error(sample_tree, tmp_path, text):
    out = tmp_path / "db"
    assert cli_build(sample_tree, out).returncode == 3
    (out / MANIFEST).write_text(text)
    assert_clean_error(cli_build(sample_tree, out, "--resume"), "not a valid imgprep manifest")
    assert_clean_error(run_cli("merge", out, tmp_path / "merged", check=False), "not a valid imgprep manifest")
    assert_clean_error(run_cli("inspect", out, check=False), "not a valid imgprep manifest")


def test_a_fifo_in_the_tree_is_a_reported_failure_not_a_hang(tree_copy, tmp_path):
    os.mkfifo(tree_copy / "train" / "n01440764" / "x.JPEG")
    lst = tmp_path / "list.txt"
    lst.write_text("n01440764/x.JPEG 0\n")
    result = run_cli("build-lmdb", lst, tree_copy / "train", tmp_path / "db", *TINY, check=False, timeout=60)
    assert result.returncode == 3, result.stderr
    [failure] = read_failures(tmp_path / "db")
    assert failure.reason == "not-a-file" and "FIFO" in failure.detail


def test_a_tab_in_a_failing_path_keeps_the_report_columns(tree_copy, tmp_path):
    (tree_copy / "train" / "n01440764" / "a\tb.JPEG").write_bytes(b"")
    lst = tmp_path / "list.txt"
    lst.write_text("n01440764/a\tb.JPEG 0\n")
    assert run_cli("build-lmdb", lst, tree_copy / "train", tmp_path / "db", *TINY, check=False).returncode == 3
    line = (tmp_path / "db" / FAILURES).read_text()
    assert line.split("\t")[:3] == ["0", "n01440764/a\\tb.JPEG", "empty"]
    assert [f.path for f in read_failures(tmp_path / "db")] == ["n01440764/a\tb.JPEG"]


def test_an_empty_list_is_refused_unless_allowed(sample_tree, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_clean_error(cli_build(sample_tree, tmp_path / "db", list_file=empty), "no entries", "--allow-empty")
    assert not (tmp_path / "db").exists()
    assert cli_build(sample_tree, tmp_path / "db", "--allow-empty", list_file=empty).returncode == 0


def test_leveldb_record_count_comes_from_a_complete_builds_manifest(sample_tree, tmp_path):
    build_database(sample_tree.lists / "val.txt", sample_tree.root / "val", tmp_path / "db",
                   BuildOptions(backend="leveldb", jobs=1), show_progress=False)
    manifest = json.loads((tmp_path / "db" / MANIFEST).read_text())
    with Reader(tmp_path / "db") as reader:
        walked = len(reader)
        assert record_count(reader, manifest) == manifest["records"] == walked
        assert record_count(reader, dict(manifest, records=10**9)) == 10**9  # not walked
        assert record_count(reader, dict(manifest, state="building")) == walked



def test_a_root_holding_none_of_the_entries_is_refused_before_anything_is_written(sample_tree, tmp_path):
    first = (sample_tree.lists / "train.txt").read_text().split("\n", 1)[0].rsplit(" ", 1)[0]
    wrong = sample_tree.root / "val"  # the other split's folder: none of train.txt's paths is there
    result = cli_build(sample_tree, tmp_path / "db", root=wrong)
    assert_clean_error(result, f"is in ROOT {wrong}", f"{wrong / first} does not exist", "--keep-going")
    assert not (tmp_path / "db").exists()
    kept = cli_build(sample_tree, tmp_path / "db", "--keep-going", root=wrong)
    assert kept.returncode == 3
    manifest = json.loads((tmp_path / "db" / MANIFEST).read_text())
    assert manifest["records"] == 0 and manifest["failure_reasons"] == {"missing": manifest["failures"]}
    # one entry there among missing ones (spread over the list, not only its head) is enough to build
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"n01440764/gone{i}.JPEG 0\n" for i in range(5)) + f"{first} 0\n")
    partly = cli_build(sample_tree, tmp_path / "partly", list_file=lst)
    assert partly.returncode == 3, partly.stderr
    assert len(db_records(tmp_path / "partly")) == 1


def test_a_fifo_where_imgprep_reads_its_own_files_is_refused_not_waited_on(sample_tree, tmp_path):
    out = tmp_path / "db"
    make_partial(sample_tree, out)
    for name in (FAILURES, "data.mdb", MANIFEST):
        os.rename(out / name, tmp_path / name)
        os.mkfifo(out / name)
        for command in (["build-lmdb", sample_tree.lists / "train.txt", sample_tree.root / "train", out, *TINY,
                         "--resume"], ["inspect", out, "--allow-partial"]):
            result = run_cli(*command, check=False, timeout=60)
            assert_clean_error(result, f"{out / name} is a FIFO, not a regular file")
        os.unlink(out / name)
        os.rename(tmp_path / name, out / name)
    assert cli_build(sample_tree, out, "--resume").returncode == 3
