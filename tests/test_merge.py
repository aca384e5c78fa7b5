import json

import pytest

from conftest import assert_clean_error, run_cli, db_records
from imgprep import ImgprepError
from imgprep.build import FAILURES, MANIFEST, BuildOptions, build_database
from imgprep.imageops import ImageSpec, parse_resize
from imgprep.mean import MeanTransform, combine, compute_mean
from imgprep.merge import merge_parts


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
    assert_clean_error(run_cli("merge", *parts, parts[2], "--overwrite", check=False), "lies inside the part")
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
