import os

from conftest import assert_clean_error, run_cli
from imgprep.build import BuildOptions, build_database
from imgprep.codec import decode_datum, encode_datum
from imgprep.imageops import ImageSpec, parse_resize
from imgprep.inspection import inspect_db
from imgprep.storage import Reader, open_writer


def make_db(sample_tree, out, backend="lmdb"):
    options = BuildOptions(backend=backend, jobs=2, shuffle=True, seed=5,
                           spec=ImageSpec(parse_resize("shorter:64"), encoded=True))
    build_database(sample_tree.lists / "train.txt", sample_tree.root / "train", out, options, show_progress=False)


def test_inspect_describes_and_checks_against_the_list(sample_tree, tmp_path):
    make_db(sample_tree, tmp_path / "db")
    result = inspect_db(tmp_path / "db", sample_tree.lists / "train.txt", verify=True, show_progress=False)
    failed = {rel for rel, kind in sample_tree.oddities.items() if kind in ("truncated", "zero_byte", "random_bytes")}
    assert {m[0] for m in result.reported} == failed  # reported by the build: not a database defect
    assert not result.missing and result.ok
    assert not result.extra and not result.mislabeled and not result.bad_records and not result.misplaced
    assert result.kinds == {"encoded": result.records} and len(result.labels) == 10
    text = "\n".join(result.lines())
    assert "state complete" in text and "shuffle True seed 5" in text
    assert "failed at build, listed in imgprep-failures.tsv (not a database defect): 3" in text


def test_readmes_inspect_example_succeeds_and_sizes_of_encoded_records_are_read(sample_tree, tmp_path):
    make_db(sample_tree, tmp_path / "db")
    result = run_cli("inspect", tmp_path / "db", "--list", sample_tree.lists / "train.txt", "--verify")
    assert result.returncode == 0 and "missing" not in result.stdout
    plain = run_cli("inspect", tmp_path / "db")  # encoded records carry no size: read from the image
    sizes = next(line for line in plain.stdout.splitlines() if line.startswith("sizes"))
    assert "0x0x0" not in sizes and "x64x3" in sizes


def test_inspect_finds_extra_mislabeled_and_undecodable_records(sample_tree, tmp_path):
    make_db(sample_tree, tmp_path / "db", backend="leveldb")
    with Reader(tmp_path / "db") as reader:
        key, value = next(reader.items())
    datum = decode_datum(value)
    writer = open_writer(tmp_path / "db", "leveldb")
    writer.put_batch([
        (key, encode_datum(datum.data, datum.label + 1, 3, datum.height, datum.width, True)),
        (b"99999999_stray.JPEG", encode_datum(b"\xff\xd8broken", 0, 3, 1, 1, True)),
    ])
    writer.close()
    result = run_cli("inspect", tmp_path / "db", "--list", sample_tree.lists / "train.txt", "--verify", check=False)
    assert result.returncode == 1
    assert "mislabeled: 1" in result.stdout and "extra: 1" in result.stdout
    assert "undecodable records: 1" in result.stdout and "99999999_stray.JPEG" in result.stdout


def test_inspect_refuses_non_datum_values_and_non_databases(tmp_path):
    writer = open_writer(tmp_path / "db", "lmdb")
    writer.put_batch([(b"k", b"\x0f\x00 not protobuf")])
    writer.close()
    assert_clean_error(run_cli("inspect", tmp_path / "db", check=False), "does not hold Caffe Datum records")
    (tmp_path / "folder").mkdir()
    assert_clean_error(run_cli("inspect", tmp_path / "folder", check=False), "neither an LMDB")


def test_a_list_that_is_a_fifo_is_refused_before_the_pass_not_waited_on(sample_tree, tmp_path):
    make_db(sample_tree, tmp_path / "db")
    os.mkfifo(tmp_path / "list.txt")
    result = run_cli("inspect", tmp_path / "db", "--list", tmp_path / "list.txt", check=False, timeout=60)
    assert_clean_error(result, f"{tmp_path / 'list.txt'} is a FIFO, not a regular file")
