"""Interoperability with BVLC Caffe's own tools, run when they are at hand:

    IMGPREP_CAFFE_TOOLS=DIR python -m pytest tests/test_interop.py    (or: make interop)

DIR holds `convert_imageset` and `compute_image_mean` (or is a Caffe build folder with them in
`tools/`). Without it every test here is skipped, saying so.
"""

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from caffe_proto import Datum
from conftest import assert_clean_error, db_records, run_cli
from imgprep.prepare.build import BuildOptions, build_database
from imgprep.formats.imageops import ImageSpec, decode_upright, keeps_original
from imgprep.formats.resizing import parse_resize
from imgprep.prepare.mean import compute_mean
from imgprep.formats.codec import load_mean

SIZE = 32  # records are squashed to SIZE x SIZE: small, quick, and enough to catch a layout error


def _tools() -> Path | None:
    given = os.environ.get("IMGPREP_CAFFE_TOOLS")
    if not given:
        return None
    for folder in (Path(given), Path(given) / "tools"):
        if (folder / "convert_imageset").is_file() and (folder / "compute_image_mean").is_file():
            return folder
    raise pytest.UsageError(f"IMGPREP_CAFFE_TOOLS={given} holds no convert_imageset and compute_image_mean "
                            "(nor does its tools/ folder)")


TOOLS = _tools()
pytestmark = pytest.mark.skipif(TOOLS is None, reason="Caffe's tools are not at hand: set IMGPREP_CAFFE_TOOLS=DIR "
                                                      "(a folder with convert_imageset and compute_image_mean)")


def caffe(tool: str, *args) -> subprocess.CompletedProcess:
    result = subprocess.run([str(TOOLS / tool), *map(str, args)], capture_output=True, text=True,
                            env=dict(os.environ, GLOG_logtostderr="1", GLOG_minloglevel="1"))
    assert result.returncode == 0, f"{tool} {args} exited {result.returncode}:\n{result.stderr[-2000:]}"
    return result


def convert_imageset(root: Path, list_file: Path, db: Path, *flags) -> Path:
    caffe("convert_imageset", *flags, f"{root}/", list_file, db)  # Caffe joins ROOT and path as strings
    return db


def caffe_mean(db: Path, backend: str, out: Path) -> np.ndarray:
    caffe("compute_image_mean", f"--backend={backend}", db, out)
    return load_mean(out)


def parse(value: bytes) -> Datum:
    datum = Datum()
    datum.ParseFromString(value)
    return datum


@pytest.fixture(scope="module")
def plain(sample_tree, tmp_path_factory):
    """(image root, list) of the sample's ordinary JPEGs, which both tools read alike."""
    list_file = tmp_path_factory.mktemp("interop") / "plain.txt"
    odd = set(sample_tree.oddities)
    lines = [line for line in (sample_tree.lists / "train.txt").read_text().splitlines()
             if line.rsplit(" ", 1)[0] not in odd]
    list_file.write_text("\n".join(lines) + "\n")
    return sample_tree.root / "train", list_file


def imgprep_db(plain, db: Path, backend="lmdb", resize=f"squash:{SIZE}x{SIZE}", encoded=False) -> Path:
    root, list_file = plain
    build_database(list_file, root, db, BuildOptions(backend=backend, spec=ImageSpec(parse_resize(resize), encoded)),
                   show_progress=False)
    return db


@pytest.mark.parametrize("backend", ["lmdb", "leveldb"])
@pytest.mark.parametrize("encoded", [False, True], ids=["raw", "encoded"])
def test_compute_image_mean_reads_imgprep_databases_and_agrees(plain, tmp_path, backend, encoded):
    db = imgprep_db(plain, tmp_path / "db", backend, encoded=encoded)
    theirs = caffe_mean(db, backend, tmp_path / "caffe.binaryproto")
    ours = compute_mean(db, show_progress=False).mean
    assert theirs.shape == ours.shape == (3, SIZE, SIZE)
    if encoded:  # Caffe decodes with OpenCV's libjpeg, imgprep with Pillow's: the same within rounding
        assert np.abs(theirs - ours).max() < 1.0
    else:  # raw: the same pixels summed; Caffe's float32 sum is exact this small
        np.testing.assert_allclose(theirs, ours, rtol=1e-6, atol=1e-4)


VARIANTS = {  # convert_imageset flags; backend
    "raw": ([f"--resize_height={SIZE}", f"--resize_width={SIZE}"], "lmdb"),
    "encoded": ([f"--resize_height={SIZE}", f"--resize_width={SIZE}", "--encoded"], "lmdb"),
    "gray": ([f"--resize_height={SIZE}", f"--resize_width={SIZE}", "--gray"], "lmdb"),
    "shuffle": ([f"--resize_height={SIZE}", f"--resize_width={SIZE}", "--shuffle"], "lmdb"),
    "leveldb": ([f"--resize_height={SIZE}", f"--resize_width={SIZE}", "--backend=leveldb"], "leveldb"),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def caffe_db(request, plain, tmp_path_factory):
    """(variant, database written by convert_imageset, backend)."""
    flags, backend = VARIANTS[request.param]
    db = tmp_path_factory.mktemp(f"caffe-{request.param}") / "db"
    return request.param, convert_imageset(*plain, db, *flags), backend


def test_inspect_verifies_what_convert_imageset_writes(caffe_db, plain):
    variant, db, _ = caffe_db
    args = ["--verify"] if variant == "shuffle" else ["--verify", "--list", plain[1]]  # keys follow the list
    result = run_cli("inspect", db, *args)
    assert f"{len(plain[1].read_text().splitlines())}" in result.stdout


def test_compute_mean_of_convert_imagesets_database_equals_caffes(caffe_db, tmp_path):
    variant, db, backend = caffe_db
    theirs = caffe_mean(db, backend, tmp_path / "caffe.binaryproto")
    run_cli("compute-mean", db, tmp_path / "ours.binaryproto")
    ours = load_mean(tmp_path / "ours.binaryproto")
    assert ours.shape == theirs.shape == ((1 if variant == "gray" else 3), SIZE, SIZE)
    if variant == "encoded":
        assert np.abs(theirs - ours).max() < 1.0
    else:
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-4)


def test_loader_reads_what_convert_imageset_writes(caffe_db):
    from imgprep.loading.loader import Loader

    variant, db, _ = caffe_db
    labels = sorted(parse(value).label for _, value in db_records(db))
    loader = Loader(db, batch_size=16, train=False, crop=SIZE - 8, resize_shorter=SIZE, normalize="none",
                    device="cpu", output="numpy")
    seen = []
    for images, batch_labels in loader:
        assert images.shape[1:] == ((1 if variant == "gray" else 3), SIZE - 8, SIZE - 8)
        assert np.isfinite(images).all() and images.max() > 0
        seen.extend(np.asarray(batch_labels).ravel().tolist())
    assert sorted(seen) == labels


def test_merge_refuses_convert_imagesets_database_clearly(caffe_db, tmp_path):
    """merge appends the parts of one sharded imgprep build, whose manifests say which part is which;
    a database from convert_imageset has none, so it is refused with the reason, never mangled."""
    _, db, _ = caffe_db
    assert_clean_error(run_cli("merge", db, tmp_path / "merged", check=False), "only imgprep builds can be merged")
    assert not (tmp_path / "merged" / "data.mdb").exists()


def _entries(list_file: Path) -> list[tuple[str, int]]:
    return [(path, int(label)) for path, label in (line.rsplit(" ", 1) for line in list_file.read_text().splitlines())]


def test_shuffled_builds_hold_the_same_entries_under_caffes_key_format(plain, tmp_path):
    """Caffe seeds its shuffle from /dev/urandom, so only the sets and the key format can agree."""
    theirs = convert_imageset(*plain, tmp_path / "caffe", f"--resize_height={SIZE}", f"--resize_width={SIZE}",
                              "--shuffle")
    root, list_file = plain
    build_database(list_file, root, tmp_path / "ours",
                   BuildOptions(shuffle=True, seed=1, spec=ImageSpec(parse_resize(f"squash:{SIZE}x{SIZE}"))),
                   show_progress=False)
    expected = sorted(_entries(list_file))
    for db in (theirs, tmp_path / "ours"):
        records = db_records(db)
        keys = [re.fullmatch(rb"(\d{8})_(.+)", key) for key, _ in records]
        assert all(keys), [key for key, _ in records][:5]
        assert sorted(int(k[1]) for k in keys) == list(range(len(expected)))
        assert sorted((k[2].decode(), parse(v).label) for k, (_, v) in zip(keys, records)) == expected


def test_raw_records_keys_labels_and_headers_equal_convert_imagesets(plain, tmp_path):
    """Same list, same spec: identical keys, and each record is Caffe's Datum byte for byte apart
    from the pixels (OpenCV's and Pillow's resizers differ slightly), which are BGR planar alike."""
    theirs = db_records(convert_imageset(*plain, tmp_path / "caffe", f"--resize_height={SIZE}",
                                         f"--resize_width={SIZE}"))
    ours = db_records(imgprep_db(plain, tmp_path / "ours"))
    assert [k for k, _ in ours] == [k for k, _ in theirs]
    for (key, our_value), (_, their_value) in zip(ours, theirs):
        their_datum, our_datum = parse(their_value), parse(our_value)
        their_datum.data = our_datum.data
        assert their_datum.SerializeToString() == our_value, key
        ours_bgr = np.frombuffer(our_datum.data, np.uint8).reshape(3, SIZE, SIZE).mean(axis=(1, 2))
        theirs_bgr = np.frombuffer(parse(their_value).data, np.uint8).reshape(3, SIZE, SIZE).mean(axis=(1, 2))
        assert np.abs(ours_bgr - theirs_bgr).max() < 6, (key, ours_bgr, theirs_bgr)


def test_encoded_records_equal_convert_imagesets_byte_for_byte(plain, tmp_path):
    """`--encoded` without resizing: Caffe stores each file's bytes with label and encoded=true and
    nothing else; so does imgprep with --resize none --encoded, for upright RGB JPEGs (others, such
    as grayscale JPEGs, imgprep stores re-encoded as upright RGB)."""
    root, list_file = plain
    spec = ImageSpec(parse_resize("none"), encoded=True)
    kept = [line for line in list_file.read_text().splitlines()
            if keeps_original(decode_upright((root / line.rsplit(" ", 1)[0]).read_bytes(), spec)[0], spec)]
    assert len(kept) > 20
    (tmp_path / "rgb.txt").write_text("\n".join(kept) + "\n")
    rgb = (root, tmp_path / "rgb.txt")
    theirs = db_records(convert_imageset(*rgb, tmp_path / "caffe", "--encoded"))
    ours = db_records(imgprep_db(rgb, tmp_path / "ours", resize="none", encoded=True))
    assert [k for k, _ in ours] == [k for k, _ in theirs]
    for (key, our_value), (_, their_value) in zip(ours, theirs):
        assert our_value == their_value, (key, our_value[:16], their_value[:16])
