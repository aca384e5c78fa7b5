"""Straight from the ILSVRC2012 archives: lists, records and resized images equal to those of the
unpacked tree; the index is made once; cut, corrupt and odd archives are clear errors or failures."""

import os
import shutil

import pytest

from conftest import assert_clean_error, db_records, run_cli
from imgprep import ImgprepError
from imgprep.build import BuildOptions, build_database, read_failures
from imgprep.imageops import ImageFailure, ImageSpec, parse_resize
from imgprep.lists import SYNSETS_FILE, ilsvrc2012_count_warnings, load_synsets, make_lists
from imgprep.listing import DEVKIT_TAR, TRAIN_TAR, VAL_TAR
from imgprep.manifest import read_manifest
from imgprep.merge import merge_parts
from imgprep.resize import resize_tree
from imgprep.sample import write_download
from imgprep.sources import open_source

pytest.importorskip("scipy")
RESNET = ImageSpec(parse_resize("shorter:256"), encoded=True, quality=90)


@pytest.fixture(scope="session")
def download(sample_tree, tmp_path_factory):
    """The shared sample tree (oddities included) packed as the three ILSVRC2012 downloads."""
    folder = tmp_path_factory.mktemp("download")
    write_download(sample_tree.root, folder)
    return folder


def folder_bytes(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_lists_from_the_archives_equal_the_unpacked_trees(sample_tree, download, tmp_path):
    run_cli("make-lists", download, "--out", tmp_path / "folder")
    run_cli("make-lists", download / TRAIN_TAR, download / VAL_TAR, download / DEVKIT_TAR, "--out", tmp_path / "files")
    expected = folder_bytes(sample_tree.lists)
    assert folder_bytes(tmp_path / "folder") == expected
    assert folder_bytes(tmp_path / "files") == expected
    assert expected["train.txt"].startswith(b"n01440764/n01440764_10000.JPEG 0\n")


def test_records_from_the_archive_equal_the_unpacked_trees(sample_tree, download, tmp_path):
    train = sample_tree.lists / "train.txt"
    options = BuildOptions(spec=RESNET, shuffle=True, seed=3, jobs=2)
    from_tree = build_database(train, sample_tree.root / "train", tmp_path / "tree", options, show_progress=False)
    from_tar = build_database(train, download / TRAIN_TAR, tmp_path / "tar", options, show_progress=False)
    assert db_records(tmp_path / "tar") == db_records(tmp_path / "tree")
    assert from_tar.failures == from_tree.failures == 3  # the sample's truncated, empty and random files
    assert (tmp_path / "tar" / "imgprep-failures.tsv").read_bytes() == \
        (tmp_path / "tree" / "imgprep-failures.tsv").read_bytes()
    identity = read_manifest(tmp_path / "tar")["identity"]
    assert identity["root"] == os.path.realpath(download / TRAIN_TAR)
    assert identity["archive_size"] == (download / TRAIN_TAR).stat().st_size
    # shards of the archive, merged, are the single build
    for i in range(2):
        build_database(train, download / TRAIN_TAR, tmp_path / f"part{i}",
                       BuildOptions(spec=RESNET, shuffle=True, seed=3, jobs=1, num_shards=2, shard_index=i),
                       show_progress=False)
    merge_parts([tmp_path / "part0", tmp_path / "part1"], tmp_path / "merged")
    assert db_records(tmp_path / "merged") == db_records(tmp_path / "tree")
    # the flat val tar, through the CLI
    val = sample_tree.lists / "val.txt"
    run_cli("build-lmdb", val, download / VAL_TAR, tmp_path / "val_tar", "--preset", "caffe")
    run_cli("build-lmdb", val, sample_tree.root / "val", tmp_path / "val_tree", "--preset", "caffe")
    assert db_records(tmp_path / "val_tar") == db_records(tmp_path / "val_tree")


def test_the_index_is_made_once_and_reused(sample_tree, download, tmp_path):
    """After the first pass, the archive's headers are not read again: with the first header destroyed
    (size and modification time kept) the second build still succeeds; once the archive's time
    changes, it is indexed again and the damage is found."""
    archive = tmp_path / TRAIN_TAR
    shutil.copy(download / TRAIN_TAR, archive)
    run_cli("make-lists", archive, "--out", tmp_path / "lists")
    stat = archive.stat()
    with open(archive, "r+b") as f:
        f.write(b"\xff" * 512)  # the header of the first class tar; its data is untouched
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    train = sample_tree.lists / "train.txt"
    run_cli("build-lmdb", train, archive, tmp_path / "db", "--preset", "resnet", check=False)
    run_cli("build-lmdb", train, sample_tree.root / "train", tmp_path / "tree", "--preset", "resnet", check=False)
    assert db_records(tmp_path / "db") == db_records(tmp_path / "tree")
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    result = run_cli("build-lmdb", train, archive, tmp_path / "db2", "--preset", "resnet", check=False)
    assert_clean_error(result, str(archive), "not a readable tar archive")


def test_a_cut_or_corrupt_archive_is_a_clear_error_naming_the_member(sample_tree, download, tmp_path):
    source = download / TRAIN_TAR
    data = source.read_bytes()
    cut = tmp_path / "cut" / TRAIN_TAR
    cut.parent.mkdir()
    cut.write_bytes(data[:len(data) // 2])  # a partial download, cut inside a class tar
    for args in (["make-lists", cut.parent, "--out", tmp_path / "o"],
                 ["build-lmdb", sample_tree.lists / "train.txt", cut, tmp_path / "db"]):
        assert_clean_error(run_cli(*args, check=False), str(cut), "is truncated: member 'n0", ".tar'", "incomplete")
    assert not (tmp_path / "db").exists()
    # a header in the middle overwritten: named by the member before it
    second = data.index(b".tar\0", 512) - 9  # the second class tar's name, at the start of its header
    corrupt = tmp_path / "corrupt.tar"
    corrupt.write_bytes(data[:second] + b"\x13" * 512 + data[second + 512:])
    assert_clean_error(run_cli("make-lists", corrupt, "--out", tmp_path / "o", check=False),
                       str(corrupt), "is corrupt after member 'n01440764.tar'")
    # a header inside a class tar: named with its class tar
    inner = data.index(b"n01440764_10001.JPEG\0")
    nested = tmp_path / "nested.tar"
    nested.write_bytes(data[:inner] + b"\x13" * 512 + data[inner + 512:])
    assert_clean_error(run_cli("make-lists", nested, "--out", tmp_path / "o", check=False),
                       f"member n01440764.tar of {nested} is corrupt after member 'n01440764/n01440764_10000.JPEG'")
    # cut exactly between two members: tarfile alone would take it for the end
    boundary = tmp_path / "boundary.tar"
    boundary.write_bytes(data[:second])
    assert_clean_error(run_cli("make-lists", boundary, "--out", tmp_path / "o", check=False),
                       str(boundary), "is truncated: it ends after member 'n01440764.tar'")
    # a compressed tar cannot be read at offsets
    assert_clean_error(run_cli("build-lmdb", sample_tree.lists / "val.txt", download / DEVKIT_TAR, tmp_path / "db",
                               check=False), "gzip-compressed", "uncompressed tar")


def test_renamed_and_non_image_members_are_failures_like_in_the_tree(tree_copy, tmp_path):
    wnid = sorted(os.listdir(tree_copy / "train"))[0]
    (tree_copy / "train" / wnid / f"{wnid}_77777.JPEG").write_text("not an image")
    make_lists(tree_copy, tmp_path / "lists", show_progress=False)
    os.rename(tree_copy / "train" / wnid / f"{wnid}_10001.JPEG", tree_copy / "train" / wnid / f"{wnid}_10001.JPG")
    write_download(tree_copy, tmp_path / "download")
    options = BuildOptions(spec=RESNET, jobs=1)
    train = tmp_path / "lists" / "train.txt"
    build_database(train, tree_copy / "train", tmp_path / "tree", options, show_progress=False)
    build_database(train, tmp_path / "download" / TRAIN_TAR, tmp_path / "tar", options, show_progress=False)
    assert db_records(tmp_path / "tar") == db_records(tmp_path / "tree")
    reasons = {f.path: f.reason for f in read_failures(tmp_path / "tar")}
    assert reasons == {f.path: f.reason for f in read_failures(tmp_path / "tree")}
    assert reasons[f"{wnid}/{wnid}_10001.JPEG"] == "missing" and f"{wnid}/{wnid}_77777.JPEG" in reasons
    detail = {f.path: f.detail for f in read_failures(tmp_path / "tar")}[f"{wnid}/{wnid}_10001.JPEG"]
    assert "no member" in detail and TRAIN_TAR in detail


def test_a_member_cut_after_indexing_fails_alone(download, tmp_path):
    archive = tmp_path / VAL_TAR
    shutil.copy(download / VAL_TAR, archive)
    source = open_source(archive, show_progress=False)
    first, last = source.members()[0], source.members()[-1]
    index = source._opened()[1]
    os.truncate(archive, int(index.offsets[index.find(last)]) + 100)  # into the last member's data
    assert source.read(first)[:2] == b"\xff\xd8"
    with pytest.raises(ImageFailure) as info:
        source.read(last)
    assert info.value.reason == "unreadable" and "cut short" in info.value.detail
    with pytest.raises(ImgprepError, match="is truncated"):  # the next command indexes it again
        open_source(archive, show_progress=False)


def test_resize_from_the_archive_equals_resize_from_the_tree(sample_tree, download, tmp_path):
    spec = ImageSpec(parse_resize("shorter:64"))
    for name, src in (("tar", download / VAL_TAR), ("tree", sample_tree.root / "val")):
        report = resize_tree(src, tmp_path / name, spec, jobs=1, show_progress=False)
        assert report.written == 30
    tree_files = {p.name: p.read_bytes() for p in (tmp_path / "tree").glob("*.JPEG")}
    assert {p.name: p.read_bytes() for p in (tmp_path / "tar").glob("*.JPEG")} == tree_files
    again = resize_tree(download / VAL_TAR, tmp_path / "tar", spec, jobs=1, show_progress=False)
    assert again.up_to_date == 30 and again.written == 0


def test_counts_check_names_the_missing_and_short_classes(tree_copy, tmp_path):
    synsets = load_synsets()
    train = [(f"{w}/{n}", i) for i, w in enumerate(synsets) for n in range(1282 if i < 167 else 1281)]
    val = [(f"v{i}_{n}", i) for i in range(1000) for n in range(50)]
    assert len(train) == 1_281_167 and ilsvrc2012_count_warnings(synsets, train, val) == []
    short_train = [e for e in train if e[1] != 5 and not (e[1] == 7 and int(e[0].split("/")[1]) >= 700)]
    short_val = val[:-1]
    train_warning, val_warning = ilsvrc2012_count_warnings(synsets, short_train, short_val)
    assert "1 class(es) without images: " + synsets[5] in train_warning
    assert f"1 class(es) under 732 images (the smallest ILSVRC2012 class has 732): {synsets[7]} (700)" in train_warning
    assert val_warning.startswith("val holds 49,999 images") and f"{synsets[999]} (49)" in val_warning
    # make-lists says it for the shipped synsets, never for another dataset's
    assert "ILSVRC2012's holds 1,281,167" in run_cli("make-lists", tree_copy, "--out", tmp_path / "a").stderr
    for args in (["--derive-synsets"], ["--synsets", SYNSETS_FILE]):
        assert "ILSVRC2012" not in run_cli("make-lists", tree_copy, "--out", tmp_path / "b", *args).stderr


def test_resume_refuses_an_archive_that_changed(sample_tree, download, tmp_path):
    archive = tmp_path / VAL_TAR
    shutil.copy(download / VAL_TAR, archive)
    val = sample_tree.lists / "val.txt"
    run_cli("build-lmdb", val, archive, tmp_path / "db")
    os.utime(archive, ns=(archive.stat().st_atime_ns, archive.stat().st_mtime_ns + 10**9))
    assert_clean_error(run_cli("build-lmdb", val, archive, tmp_path / "db", "--resume", check=False),
                       "cannot resume", "archive_mtime_ns")


def test_a_worker_without_the_index_makes_its_own(download, tmp_path):
    """A worker on another machine (Dask) cannot see the index in this machine's cache: it indexes the
    archive itself, in its own cache."""
    import pickle
    import subprocess
    import sys

    source = open_source(download / VAL_TAR, show_progress=False)
    first = source.members()[0]
    (tmp_path / "source.pickle").write_bytes(pickle.dumps(source))
    expected = source.read(first)
    os.unlink(source.index_file)  # not there on the worker's machine
    elsewhere = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "other-cache"))
    code = ("import pickle, sys; s = pickle.load(open(sys.argv[1], 'rb')); "
            "sys.stdout.buffer.write(s.read(sys.argv[2]))")
    result = subprocess.run([sys.executable, "-c", code, tmp_path / "source.pickle", first], env=elsewhere,
                            capture_output=True, check=True)
    assert result.stdout == expected
    assert list((tmp_path / "other-cache" / "imgprep" / "archive-index").iterdir())


def test_a_member_that_would_leave_the_folder_is_refused_and_nothing_is_written_outside(sample_tree, tmp_path):
    import io
    import tarfile

    image = next((sample_tree.root / "val").glob("*.JPEG")).read_bytes()
    for name in ("../evil.JPEG", "a/../../evil.JPEG"):
        archive = tmp_path / "work" / "val.tar"
        archive.parent.mkdir(exist_ok=True)
        with tarfile.open(archive, "w") as tar:
            for member in ("ok.JPEG", name):
                info = tarfile.TarInfo(member)
                info.size = len(image)
                tar.addfile(info, io.BytesIO(image))
        result = run_cli("resize", archive, tmp_path / "work" / "out" / "dst", "--resize", "shorter:32", check=False)
        assert_clean_error(result, name, "outside")
        assert not list(tmp_path.rglob("evil.JPEG")) and not (tmp_path / "work" / "out" / "dst").exists()
        assert_clean_error(run_cli("make-lists", archive, "--out", tmp_path / "lists", check=False), name)


def test_resize_writes_only_plain_relative_paths_inside_dst(tmp_path):
    from imgprep.resize import output_path

    for rel in ("../x.JPEG", "a/../../x.JPEG", "a//x.JPEG", "./x.JPEG"):
        with pytest.raises(ImageFailure) as info:
            output_path(tmp_path / "dst", rel, set())
        assert info.value.reason == "unsafe-output"
    assert not (tmp_path / "x.JPEG").exists()
