import json
import os
import resource
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import IMGPREP, assert_clean_error, db_records, folder_alias, run_cli
from imgprep import ImgprepError
from imgprep.prepare.build import BuildOptions, build_database
from imgprep.formats.manifest import MANIFEST
from imgprep.formats.codec import encode_datum, raw_datum_prefix
from imgprep.formats.imageops import ImageSpec, center_crop, decode_upright, to_bgr_chw
from imgprep.formats.resizing import parse_resize
from imgprep.prepare.mean import MeanTransform, compute_mean, write_mean
from imgprep.formats.codec import load_mean
from imgprep.formats.storage import Reader, open_writer

BLOB_HEADER = bytes.fromhex("08 01 10 03 18 80 02 20 80 02 2a 80 80 30")


@pytest.fixture(scope="module")
def dbs(sample_tree, tmp_path_factory):
    base = tmp_path_factory.mktemp("meandbs")
    made = {}
    for name, spec, backend in (("raw", "squash:256x256", "lmdb"), ("raw_leveldb", "squash:256x256", "leveldb"),
                                ("encoded", "squash:256x256", "lmdb"), ("resnet", "shorter:256", "lmdb")):
        options = BuildOptions(backend=backend, jobs=2, shuffle=True,
                               spec=ImageSpec(parse_resize(spec), encoded=name != "raw" and name != "raw_leveldb",
                                              quality=95))
        build_database(sample_tree.lists / "train.txt", sample_tree.root / "train", base / name, options,
                       show_progress=False)
        made[name] = base / name
    return made


def caffe_compute_image_mean(db):
    """compute_image_mean's algorithm: float32 sum of every raw record, in key order, / count."""
    from caffe_proto import Datum

    total, count = None, 0
    with Reader(db) as reader:
        for _, value in reader.items():
            datum = Datum()
            datum.ParseFromString(value)
            pixels = np.frombuffer(datum.data, np.uint8).astype(np.float32)
            total = pixels if total is None else (total + pixels).astype(np.float32)
            count += 1
    return (total / np.float32(count)).reshape(datum.channels, datum.height, datum.width)


def test_raw_mean_equals_caffes_and_file_layout_is_caffes(dbs, tmp_path):
    result = compute_mean(dbs["raw"], jobs=2, show_progress=False)
    out = tmp_path / "mean.binaryproto"
    write_mean(result, out)
    data = out.read_bytes()
    assert data.startswith(BLOB_HEADER) and len(data) == len(BLOB_HEADER) + 4 * 3 * 256 * 256
    np.testing.assert_allclose(load_mean(out), caffe_compute_image_mean(dbs["raw"]), rtol=1e-6, atol=1e-4)


def test_lmdb_and_leveldb_give_the_same_mean(dbs):
    a = compute_mean(dbs["raw"], jobs=2, show_progress=False)
    b = compute_mean(dbs["raw_leveldb"], jobs=2, show_progress=False)
    c = compute_mean(dbs["raw"], jobs=1, show_progress=False)
    assert a.count == b.count == c.count
    np.testing.assert_array_equal(a.sums, b.sums)
    np.testing.assert_array_equal(a.sums, c.sums)


def test_encoded_and_raw_agree_within_jpeg_tolerance(dbs):
    raw = compute_mean(dbs["raw"], show_progress=False).mean
    encoded = compute_mean(dbs["encoded"], show_progress=False).mean
    assert np.abs(raw - encoded).mean() < 1.0


def test_mixed_sizes_need_crop_and_crop_mean_is_right(dbs, sample_tree):
    with pytest.raises(ImgprepError, match="records differ in size.*--crop 224"):
        compute_mean(dbs["resnet"], show_progress=False)
    result = compute_mean(dbs["resnet"], MeanTransform(crop=224), jobs=2, show_progress=False)
    assert result.mean.shape == (3, 224, 224)
    reference = np.zeros((3, 224, 224))
    spec = ImageSpec(parse_resize("shorter:256"))
    from imgprep.formats.lists import read_list
    entries = read_list(sample_tree.lists / "train.txt")
    n = 0
    for rel in entries.paths:
        try:
            img = decode_upright((sample_tree.root / "train" / rel).read_bytes(), spec)[1]
        except Exception:
            continue
        reference += to_bgr_chw(center_crop(np.asarray(img), 224)).astype(np.float64)
        n += 1
    assert n == result.count
    assert np.abs(result.mean - reference / n).mean() < 1.0  # the records are JPEG q95
    squashed = compute_mean(dbs["resnet"], MeanTransform(resize=parse_resize("squash:64x64")), show_progress=False)
    assert squashed.mean.shape == (3, 64, 64)


def test_mean_is_exact_where_float32_drifts(tmp_path):
    """70,000 records: past 2^24/255 a float32 sum loses the ones; the integer sum does not."""
    n, shape = 70_000, (3, 4, 4)
    rng = np.random.default_rng(0)
    base = rng.integers(200, 256, size=shape, dtype=np.uint8)
    base[1, 1, 1] = 255
    writer = open_writer(tmp_path / "db", "lmdb")
    batch = []
    for i in range(n):
        pixels = base.copy()
        pixels[0, 0, 0] = i % 256
        batch.append((f"{i:08d}_x".encode(), encode_datum(pixels.tobytes(), 0, *shape, False)))
        if len(batch) == 5000:
            writer.put_batch(batch)
            batch = []
    writer.close()
    result = compute_mean(tmp_path / "db", jobs=2, show_progress=False)
    reference = base.astype(np.float64)
    reference[0, 0, 0] = np.mean(np.arange(n) % 256)
    assert np.abs(result.mean - reference).max() < 1e-4
    drifting = np.float32(0)
    for i in range(n):
        drifting = np.float32(drifting + np.float32(base[1, 1, 1]))
    assert abs(drifting / n - base[1, 1, 1]) > 1e-4  # what Caffe's float32 sum would give


def test_not_datum_records_and_bad_mean_files_are_clear_errors(tmp_path):
    writer = open_writer(tmp_path / "db", "lmdb")
    writer.put_batch([(b"00000000_a", b"hello, not a datum")])
    writer.close()
    assert_clean_error(run_cli("compute-mean", tmp_path / "db", tmp_path / "m.binaryproto", check=False),
                       "does not hold Caffe Datum records")
    good = tmp_path / "good.binaryproto"
    good.write_bytes(BLOB_HEADER + bytes(8))
    with pytest.raises(ImgprepError, match="not a valid .binaryproto"):
        load_mean(good)
    with pytest.raises(ImgprepError, match="cannot read mean file"):
        load_mean(tmp_path / "absent.binaryproto")


def test_cli_writes_values(dbs, tmp_path):
    result = run_cli("compute-mean", dbs["raw"], tmp_path / "m.binaryproto", "--values-out", tmp_path / "v.json")
    assert "mean (BGR)" in result.stdout and "compute-mean:" in result.stderr
    import json
    values = json.loads((tmp_path / "v.json").read_text())
    assert values["rgb"] == values["bgr"][::-1] and values["count"] > 100


def test_compute_mean_counts_each_database_once_and_never_writes_into_one(dbs, tmp_path):
    db = tmp_path / "db"
    shutil.copytree(dbs["raw"], db)
    before = db_records(db)
    assert_clean_error(run_cli("compute-mean", db, db, tmp_path / "m.binaryproto", check=False), "given twice")
    assert_clean_error(run_cli("compute-mean", db, db / "data.mdb", check=False), "lies inside the database")
    assert_clean_error(run_cli("compute-mean", db, tmp_path / "m.binaryproto", "--values-out", db / "v.json",
                               check=False), "lies inside the database")
    assert db_records(db) == before and not (tmp_path / "m.binaryproto").exists()


def test_compute_mean_refuses_an_incomplete_build_unless_allowed(dbs, tmp_path):
    db = tmp_path / "db"
    shutil.copytree(dbs["raw_leveldb"], db)
    manifest = json.loads((db / MANIFEST).read_text())
    (db / MANIFEST).write_text(json.dumps(dict(manifest, state="building")))
    assert_clean_error(run_cli("compute-mean", db, tmp_path / "m.binaryproto", check=False),
                       "incomplete build", "--resume", "--allow-partial")
    result = run_cli("compute-mean", db, tmp_path / "m.binaryproto", "--allow-partial")
    assert "mean (BGR)" in result.stdout


def test_gray_encoded_records_without_channels_give_a_one_channel_mean(sample_tree, tmp_path):
    options = BuildOptions(jobs=1, spec=ImageSpec(parse_resize("squash:16x16"), encoded=True, gray=True))
    build_database(sample_tree.lists / "val.txt", sample_tree.root / "val", tmp_path / "db", options,
                   show_progress=False)
    assert compute_mean(tmp_path / "db", show_progress=False).mean.shape == (1, 16, 16)


def _write(db, backend, items):
    writer = open_writer(db, backend)
    writer.put_batch(items)
    writer.close()


@pytest.mark.parametrize("backend", ["lmdb", "leveldb"])
def test_records_in_any_valid_encoding_are_summed_exactly_by_every_thread(tmp_path, backend):
    """Caffe's layout is summed in place; reordered fields, long labels and unknown fields go
    through the full decoder; 3 threads over 2,001 records give the exact sum."""
    shape, n = (3, 5, 7), 2001
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    items = []
    for i, pixels in enumerate(images):
        value = encode_datum(pixels.tobytes(), i % 1000, *shape, False)
        if i % 7 == 1:
            head = len(raw_datum_prefix(*shape)) + pixels.size  # then label and encoded:
            value = value[head:] + value[:head]  # written first, valid protobuf, not Caffe's order
        elif i % 7 == 2:
            value += bytes.fromhex("48 05")  # unknown field 9, which decoders skip
        items.append((f"{i:08d}_x".encode(), value))
    _write(tmp_path / "db", backend, items)
    expected = images.astype(np.uint64).sum(axis=0)
    for jobs in (1, 3):
        result = compute_mean(tmp_path / "db", jobs=jobs, show_progress=False)
        assert result.count == n
        np.testing.assert_array_equal(result.sums, expected)


def test_a_raw_looking_record_flagged_encoded_is_not_summed_as_pixels(tmp_path):
    shape = (3, 4, 4)
    good = encode_datum(bytes(48), 0, *shape, False)
    flagged = good[:-1] + b"\x01"  # the same bytes with encoded=true: a (broken) JPEG, not pixels
    _write(tmp_path / "db", "lmdb", [(b"00000000_a", good), (b"00000001_b", flagged)])
    with pytest.raises(ImgprepError, match="00000001_b.*does not decode"):
        compute_mean(tmp_path / "db", jobs=1, show_progress=False)


def test_a_record_of_another_size_is_named_from_any_thread(tmp_path):
    items = [(f"{i:08d}_x".encode(), encode_datum(bytes(48), 0, 3, 4, 4, False)) for i in range(1500)]
    items[1200] = (items[1200][0], encode_datum(bytes(75), 0, 3, 5, 5, False))
    _write(tmp_path / "db", "lmdb", items)
    with pytest.raises(ImgprepError, match="00001200_x is 5x5x3"):
        compute_mean(tmp_path / "db", jobs=2, show_progress=False)


def test_a_truncated_record_after_a_bare_one_is_a_clear_error(tmp_path):
    """A record of just the pixels (no label, no encoded: valid) then one cut short."""
    bare = raw_datum_prefix(3, 4, 4) + bytes(48)
    _write(tmp_path / "db", "lmdb", [(b"00000000_a", bare), (b"00000001_b", bare[:-1])])
    with pytest.raises(ImgprepError, match="00000001_b"):
        compute_mean(tmp_path / "db", jobs=1, show_progress=False)


@pytest.mark.parametrize("kind", ["bind mount", "symbolic link"])
def test_every_overlap_is_found_whatever_name_a_database_goes_by(dbs, tmp_path, kind):
    db = tmp_path / "db"
    shutil.copytree(dbs["raw"], db)
    before = db_records(db)
    mean = tmp_path / "m.binaryproto"
    with folder_alias(db, tmp_path / "alias", kind) as alias:
        assert_clean_error(run_cli("compute-mean", db, alias / "data.mdb", check=False), "lies inside the database")
        assert_clean_error(run_cli("compute-mean", db, alias, mean, check=False), "given twice", str(alias))
        assert_clean_error(run_cli("compute-mean", db, mean, "--values-out", alias / "v.json", check=False),
                           "lies inside the database")
    assert db_records(db) == before and not mean.exists()


def test_a_hard_link_to_a_database_file_is_that_file(dbs, tmp_path):
    db = tmp_path / "db"
    shutil.copytree(dbs["raw"], db)
    before = db_records(db)
    os.link(db / "data.mdb", tmp_path / "linked.mdb")
    assert_clean_error(run_cli("compute-mean", db, tmp_path / "linked.mdb", check=False), "is a file of the database")
    assert_clean_error(run_cli("compute-mean", db, tmp_path / "m.binaryproto", "--values-out", tmp_path / "linked.mdb",
                               check=False), "is a file of the database")
    assert_clean_error(run_cli("compute-mean", db, tmp_path / "m.binaryproto", "--values-out",
                               tmp_path / "m.binaryproto", check=False), "are the same file")
    assert db_records(db) == before and not (tmp_path / "m.binaryproto").exists()


def test_the_mean_is_written_atomically_and_never_through_a_link(dbs, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "m.binaryproto").symlink_to(victim)
    (tmp_path / "dangling.binaryproto").symlink_to(tmp_path / "made-through-the-link")
    for args in ([tmp_path / "m.binaryproto"], [tmp_path / "dangling.binaryproto"],
                 [tmp_path / "ok.binaryproto", "--values-out", tmp_path / "m.binaryproto"]):
        assert_clean_error(run_cli("compute-mean", dbs["raw"], *args, check=False), "symbolic link")
    assert victim.read_text() == "precious" and not (tmp_path / "made-through-the-link").exists()
    assert not (tmp_path / "ok.binaryproto").exists()

    out = tmp_path / "mean.binaryproto"  # the write fails half-way (a file-size limit): the old mean stays whole
    out.write_bytes(b"the previous mean")

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    result = subprocess.run([*IMGPREP, "compute-mean", str(dbs["raw"]), str(out), "--jobs", "1", "--overwrite"],
                            capture_output=True, text=True, preexec_fn=cap)
    assert_clean_error(result, f"cannot write {out}: File too large")
    assert out.read_bytes() == b"the previous mean"
    assert sorted(os.listdir(tmp_path)) == ["dangling.binaryproto", "m.binaryproto", "mean.binaryproto", "victim"]
    run_cli("compute-mean", dbs["raw"], out, "--overwrite")
    assert load_mean(out).shape == (3, 256, 256)


def test_an_existing_mean_or_values_file_is_replaced_only_with_overwrite(dbs, tmp_path):
    out, values = tmp_path / "m.binaryproto", tmp_path / "v.json"
    for mine, args in ((out, [out]), (values, [tmp_path / "new.binaryproto", "--values-out", values])):
        mine.write_bytes(b"mine")
        result = run_cli("compute-mean", dbs["raw"], *args, check=False)
        assert_clean_error(result, f"{mine} exists; pass --overwrite to replace it")
        assert "compute-mean:" not in result.stderr  # refused before a pass over the records
        assert mine.read_bytes() == b"mine" and not (tmp_path / "new.binaryproto").exists()
    run_cli("compute-mean", dbs["raw"], out, "--values-out", values, "--overwrite")
    assert load_mean(out).shape == (3, 256, 256) and json.loads(values.read_text())["count"] == len(db_records(dbs["raw"]))
    result, before = compute_mean(dbs["raw"], show_progress=False), out.read_bytes()  # the API: the same rule
    with pytest.raises(ImgprepError, match="exists; pass --overwrite"):
        write_mean(result, tmp_path / "fresh.binaryproto", values_out=values)
    assert not (tmp_path / "fresh.binaryproto").exists()
    write_mean(result, out, overwrite=True)
    assert out.read_bytes() == before


def test_every_output_is_checked_before_any_work(dbs, tmp_path):
    out = tmp_path / "m.binaryproto"
    for args in ([out, "--values-out", tmp_path / "absent" / "v.json"], [tmp_path / "absent" / "m.binaryproto"]):
        result = run_cli("compute-mean", dbs["raw"], *args, check=False)
        assert_clean_error(result, f"the folder {tmp_path / 'absent'} does not exist")
        assert "compute-mean:" not in result.stderr  # no pass over the records was made
    assert not out.exists()
    os.mkfifo(tmp_path / "fifo.json")
    assert_clean_error(run_cli("compute-mean", dbs["raw"], out, "--values-out", tmp_path / "fifo.json", check=False,
                               timeout=60), "is a FIFO")
    assert not out.exists()


def test_a_channel_mismatch_is_named_and_never_answered_with_crop(tmp_path):
    _write(tmp_path / "db", "lmdb", [(b"00000000_a", encode_datum(bytes(3 * 64), 0, 3, 8, 8, False)),
                                     (b"00000001_b", encode_datum(bytes(64), 0, 1, 8, 8, False))])
    for transform in (MeanTransform(crop=4), MeanTransform(parse_resize("squash:8x8")), MeanTransform()):
        with pytest.raises(ImgprepError, match="channel counts differ") as error:
            compute_mean(tmp_path / "db", transform, jobs=1, show_progress=False)
        assert "--crop" not in str(error.value) and "--gray" in str(error.value)


def test_a_fifo_where_a_file_is_read_is_refused_not_waited_on(dbs, tmp_path):
    db = tmp_path / "db"
    shutil.copytree(dbs["raw"], db)
    (db / MANIFEST).unlink()
    os.mkfifo(db / MANIFEST)
    assert_clean_error(run_cli("compute-mean", db, tmp_path / "m.binaryproto", check=False, timeout=60),
                       f"{db / MANIFEST} is a FIFO, not a regular file")
    os.mkfifo(tmp_path / "mean.binaryproto")  # a mean file for the loader or the Dataset
    loaded = subprocess.run([sys.executable, "-c", "import sys; from imgprep.formats.codec import load_mean; "
                             "load_mean(sys.argv[1])", str(tmp_path / "mean.binaryproto")],
                            capture_output=True, text=True, timeout=60)
    assert loaded.returncode == 1 and "is a FIFO, not a regular file" in loaded.stderr, loaded.stderr


def test_compute_mean_of_raw_records_loads_no_image_library(dbs, tmp_path):
    """compute-mean's start-up is most of its time on a small database: summing raw records as
    stored needs numpy and LMDB, not Pillow; an encoded database still decodes (and loads it)."""
    script = ("import sys\nfrom imgprep.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
              "    assert not e.code, e.code\nprint(sorted(m for m in sys.modules if m == 'PIL' or m.startswith('PIL.')))")
    for name, loaded in (("raw", "[]"), ("encoded", "PIL.Image")):
        out = subprocess.run([sys.executable, "-c", script, "compute-mean", str(dbs[name]),
                              str(tmp_path / f"{name}.binaryproto")], capture_output=True, text=True, check=True).stdout
        assert loaded in out.splitlines()[-1], (name, out)
