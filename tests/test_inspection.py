import os

from conftest import assert_clean_error, run_cli
from imgprep.prepare.build import BuildOptions, build_database
from imgprep.formats.codec import decode_datum, encode_datum
from imgprep.formats.imageops import ImageSpec
from imgprep.formats.resizing import parse_resize
from imgprep.prepare.inspection import inspect_db
from imgprep.prepare.merge import merge_parts
from imgprep.formats.storage import Reader, open_writer


def make_db(sample_tree, out, backend="lmdb", list_file=None, shuffle=True, **options):
    options = BuildOptions(backend=backend, jobs=2, shuffle=shuffle, seed=5,
                           spec=ImageSpec(parse_resize("shorter:64"), encoded=True), **options)
    build_database(list_file or sample_tree.lists / "train.txt", sample_tree.root / "train", out, options,
                   show_progress=False)


def good_list(sample_tree, path):
    """The sample's train list without the images no build can use."""
    lines = [line for line in (sample_tree.lists / "train.txt").read_text().splitlines()
             if sample_tree.oddities.get(line.rsplit(" ", 1)[0]) not in ("truncated", "zero_byte", "random_bytes")]
    path.write_text("".join(f"{line}\n" for line in lines))
    return path, len(lines)


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


def test_list_and_verify_end_with_a_verdict_saying_what_was_checked_and_that_it_passed(sample_tree, tmp_path):
    listing, n = good_list(sample_tree, tmp_path / "good.txt")
    make_db(sample_tree, tmp_path / "db", list_file=listing)
    env = dict(os.environ, IMGPREP_PROGRESS_INTERVAL="0")
    both = run_cli("inspect", tmp_path / "db", "--list", listing, "--verify", env=env)
    assert both.stdout.splitlines()[-1] == (f"OK: {n} entries: every one present under its key with its label; "
                                            f"{n} records decoded")
    assert f"inspect: 1/{n} (" in both.stderr and f"inspect: {n}/{n} (100.0%)" in both.stderr  # progress
    listed = run_cli("inspect", tmp_path / "db", "--list", listing, env=env)
    assert listed.stdout.splitlines()[-1] == f"OK: {n} entries: every one present under its key with its label"
    assert f"inspect: {n}/{n}" in listed.stderr  # the list check reads every record too: progress
    assert run_cli("inspect", tmp_path / "db", "--verify").stdout.splitlines()[-1] == f"OK: {n} records decoded"
    assert not run_cli("inspect", tmp_path / "db").stdout.splitlines()[-1].startswith("OK")  # nothing checked

    make_db(sample_tree, tmp_path / "with_failures")  # the full list: three images fail at build
    reported = run_cli("inspect", tmp_path / "with_failures", "--list", sample_tree.lists / "train.txt")
    total = len((sample_tree.lists / "train.txt").read_text().splitlines())
    assert reported.stdout.splitlines()[-1] == (
        f"OK: {total} entries: {total - 3} present under their key with their label, the other 3 failed at build "
        "(listed in imgprep-failures.tsv)")


def test_a_mismatch_is_reported_by_kind_sorted_counted_with_a_few_examples(sample_tree, tmp_path):
    listing, n = good_list(sample_tree, tmp_path / "good.txt")
    make_db(sample_tree, tmp_path / "db", list_file=listing, shuffle=False)
    longer = tmp_path / "longer.txt"
    extra = [f"n01440764/n01440764_{900 + i}.JPEG 0" for i in range(7)]
    longer.write_text(listing.read_text() + "".join(f"{line}\n" for line in reversed(extra)))
    with Reader(tmp_path / "db") as reader:
        key, value = next(reader.items())
    datum = decode_datum(value)
    writer = open_writer(tmp_path / "db", "lmdb")
    writer.put_batch([(key, encode_datum(datum.data, datum.label + 3, 0, 0, 0, True))])
    writer.close()
    result = run_cli("inspect", tmp_path / "db", "--list", longer, check=False)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert "('" not in result.stdout and "(b'" not in result.stdout  # words, not Python tuples
    start = lines.index("missing: 7")
    shown = lines[start + 1:start + 6]
    assert shown == sorted(shown) and len(shown) == 5 and all(line.startswith("  n01440764/") for line in shown)
    assert shown[0] == "  n01440764/n01440764_900.JPEG: not in the database"
    assert lines[start + 6] == "  ... and 2 more"
    mislabeled = lines.index("mislabeled: 1")
    assert lines[mislabeled + 1] == f"  {key.decode()}: stored label {datum.label + 3}, the list says {datum.label}"
    assert lines[-1] == f"FAILED: {n + 7} entries checked against the list: 7 missing, 1 mislabeled"


def test_inspect_of_a_merged_database_says_how_it_was_made(sample_tree, tmp_path):
    parts = [tmp_path / f"part{i}" for i in range(2)]
    for i, part in enumerate(parts):
        make_db(sample_tree, part, num_shards=2, shard_index=i)
    merge_parts(parts, tmp_path / "merged", show_progress=False)
    text = run_cli("inspect", tmp_path / "merged").stdout
    assert f"merged by imgprep merge from 2 parts ({parts[0]}, {parts[1]}): state complete" in text
    assert "None" not in text


def test_a_list_that_is_a_fifo_is_refused_before_the_pass_not_waited_on(sample_tree, tmp_path):
    make_db(sample_tree, tmp_path / "db")
    os.mkfifo(tmp_path / "list.txt")
    result = run_cli("inspect", tmp_path / "db", "--list", tmp_path / "list.txt", check=False, timeout=60)
    assert_clean_error(result, f"{tmp_path / 'list.txt'} is a FIFO, not a regular file")
