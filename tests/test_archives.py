"""Straight from the ILSVRC2012 archives: lists, records and resized images equal to those of the
unpacked tree; the index is made once; cut, corrupt and odd archives are clear errors or failures."""

import json
import os
import shutil

import pytest

from conftest import assert_clean_error, db_records, run_cli
from imgprep import ImgprepError
from imgprep.prepare.archives import archive_key, index_path
from imgprep.prepare.build import BuildOptions, build_database
from imgprep.formats.manifest import read_failures
from imgprep.formats.imageops import ImageFailure, ImageSpec
from imgprep.formats.resizing import parse_resize
from imgprep.formats.lists import SYNSETS_FILE, load_synsets
from imgprep.prepare.make_lists import ilsvrc2012_count_warnings, make_lists
from imgprep.prepare.download import DEVKIT_TAR, TRAIN_TAR, VAL_TAR
from imgprep.formats.manifest import read_manifest
from imgprep.prepare.merge import merge_parts
from imgprep.prepare.resize import resize_tree
from imgprep.prepare.sample import write_download
from imgprep.prepare.sources import open_source

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
    """After the first pass, the archive's headers are not read again: the second command finds the
    index made by the first (the index file is not written again). Any rewrite of the archive, even
    one that puts its size and modification time back, makes a new one, and the damage is found."""
    archive = tmp_path / TRAIN_TAR
    shutil.copy(download / TRAIN_TAR, archive)
    run_cli("make-lists", archive, "--out", tmp_path / "lists")
    index_file = index_path(archive_key(archive))
    made = index_file.stat()
    train = sample_tree.lists / "train.txt"
    run_cli("build-lmdb", train, archive, tmp_path / "db", "--preset", "resnet", check=False)
    run_cli("build-lmdb", train, sample_tree.root / "train", tmp_path / "tree", "--preset", "resnet", check=False)
    assert db_records(tmp_path / "db") == db_records(tmp_path / "tree")
    assert (index_file.stat().st_ino, index_file.stat().st_mtime_ns) == (made.st_ino, made.st_mtime_ns)
    stat = archive.stat()
    with open(archive, "r+b") as f:
        f.write(b"\xff" * 512)  # the header of the first class tar; its data is untouched
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns))
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
    assert "1 class without images: " + synsets[5] in train_warning
    assert f"1 class under 732 images (the smallest ILSVRC2012 class has 732): {synsets[7]} (700)" in train_warning
    assert val_warning.startswith("val holds 49,999 images") and f"{synsets[999]} (49)" in val_warning
    # make-lists says it for the shipped synsets, never for another dataset's
    assert "ILSVRC2012's holds 1,281,167" in run_cli("make-lists", tree_copy, "--out", tmp_path / "a").stderr
    for args in (["--derive-synsets"], ["--synsets", SYNSETS_FILE]):  # each its own --out: the lists differ
        out = tmp_path / args[0].lstrip("-")
        assert "ILSVRC2012" not in run_cli("make-lists", tree_copy, "--out", out, *args).stderr


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
    from imgprep.prepare.resize import output_path

    for rel in ("../x.JPEG", "a/../../x.JPEG", "a//x.JPEG", "./x.JPEG"):
        with pytest.raises(ImageFailure) as info:
            output_path(tmp_path / "dst", rel, set())
        assert info.value.reason == "unsafe-output"
    assert not (tmp_path / "x.JPEG").exists()


# ---------------------------------------------------------------------------------------------
# An archive is trusted only where its headers say so


def _pack(archive, members, fmt=None):
    """A tar of (name, bytes) members, written by Python's tarfile."""
    import io
    import tarfile

    with tarfile.open(archive, "w", format=fmt or tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_000_000_000
            tar.addfile(info, io.BytesIO(data))


def _six_val_images(sample_tree, tmp_path):
    """Six distinct val images as a folder, and a list labelling each with its index (so a label names
    its image). Each is padded to one size (decoders ignore bytes after the JPEG's end), so that at
    another's offset a reader finds a whole, valid image."""
    names = sorted(os.listdir(sample_tree.root / "val"))[:6]
    folder = tmp_path / "six"
    folder.mkdir()
    images = [(sample_tree.root / "val" / name).read_bytes() for name in names]
    for name, image in zip(names, images):
        (folder / name).write_bytes(image.ljust(max(map(len, images)), b"\0"))
    listing = tmp_path / "six.txt"
    listing.write_text("".join(f"{name} {i}\n" for i, name in enumerate(names)))
    return names, folder, listing


def _split_index(data: bytes) -> tuple[dict, bytes]:
    """An index file's header fields and its body (what follows the header's padding)."""
    end = data.index(b"\n", data.index(b"\n") + 1) + 1
    return json.loads(data[data.index(b"\n") + 1:end]), data[end + (-end % 8):]


def _index_bytes(fields: dict, body: bytes, magic: bytes = b"imgprep-archive-index/2") -> bytes:
    head = magic + b"\n" + json.dumps(fields).encode() + b"\n"
    return head + b"\0" * (-len(head) % 8) + body


def _replace(path, data: bytes) -> None:
    """Writes `path` anew, as another program would (a process that maps the old file keeps it)."""
    path.with_name("new").write_bytes(data)
    os.replace(path.with_name("new"), path)


def _rewrite_in_place(archive, members):
    """Rewrites `archive` (same inode) with `members`, then puts its old modification time back with
    `touch -r`, as a careless copy or a sync tool may."""
    import subprocess

    reference = archive.with_name("reference")
    reference.touch()
    old = archive.stat()
    os.utime(reference, ns=(old.st_atime_ns, old.st_mtime_ns))
    replacement = archive.with_name("replacement.tar")
    _pack(replacement, members)
    assert replacement.stat().st_size == old.st_size  # the same members, so the same size
    with open(archive, "r+b") as f:
        f.write(replacement.read_bytes())
    subprocess.run(["touch", "-r", str(reference), str(archive)], check=True)
    assert (archive.stat().st_size, archive.stat().st_mtime_ns) == (old.st_size, old.st_mtime_ns)


def test_a_rewritten_archive_is_never_read_at_its_old_offsets(sample_tree, tmp_path):
    """The same members in another order, padded to the same size and given the old modification time:
    the next command indexes it again (its records equal the folder's), --resume refuses it, and an
    index that still describes the old archive stops the build with an error saying the archive
    changed, never records holding other members' images."""
    names, folder, listing = _six_val_images(sample_tree, tmp_path)
    members = [(name, (folder / name).read_bytes()) for name in names]
    archive = tmp_path / "val.tar"
    _pack(archive, members)
    run_cli("build-lmdb", listing, folder, tmp_path / "tree", "--preset", "resnet")
    run_cli("build-lmdb", listing, archive, tmp_path / "first", "--preset", "resnet")
    assert db_records(tmp_path / "first") == db_records(tmp_path / "tree")
    stale = index_path(archive_key(archive)).read_bytes()

    _rewrite_in_place(archive, members[::-1])
    run_cli("build-lmdb", listing, archive, tmp_path / "second", "--preset", "resnet")
    assert db_records(tmp_path / "second") == db_records(tmp_path / "tree")
    run_cli("inspect", tmp_path / "second", "--list", listing, "--verify")
    assert_clean_error(run_cli("build-lmdb", listing, archive, tmp_path / "first", "--preset", "resnet", "--resume",
                               check=False), "cannot resume", "archive_members_sha256")

    # an index of the old archive under the new archive's key: every read checks the member's header
    fields, body = _split_index(stale)
    _replace(index_path(archive_key(archive)), _index_bytes(dict(fields, **archive_key(archive)), body))
    result = run_cli("build-lmdb", listing, archive, tmp_path / "third", "--preset", "resnet", check=False)
    assert_clean_error(result, str(archive), "changed since it was indexed", "run the command again")
    assert "complete" not in result.stderr
    # and within one process, between two reads
    _rewrite_in_place(archive, members)
    source = open_source(archive, show_progress=False)
    assert source.read(names[0]) == members[0][1]
    _rewrite_in_place(archive, members[::-1])
    with pytest.raises(ImgprepError, match="changed since it was indexed"):
        source.read(names[0])


def test_a_damaged_cached_index_is_made_again_with_a_warning(sample_tree, tmp_path, capsys):
    names, folder, _ = _six_val_images(sample_tree, tmp_path)
    archive = tmp_path / "val.tar"
    _pack(archive, [(name, (folder / name).read_bytes()) for name in names])
    open_source(archive, show_progress=False)
    index_file = index_path(archive_key(archive))
    good = index_file.read_bytes()
    fields, body = _split_index(good)

    def with_header(**changes):
        return _index_bytes({k: v for k, v in dict(fields, **changes).items() if v is not None}, body)

    start = len(good) - len(body)
    huge_size = bytearray(good)
    huge_size[start + 8 * len(names):start + 8 * len(names) + 8] = (2**40).to_bytes(8, "little")
    flipped = bytearray(good)
    flipped[start] ^= 0x01  # the first member's offset, one byte off; the length is unchanged
    damages = {"one offset flipped": bytes(flipped), "an entry's size 2**40": bytes(huge_size),
               "no count": with_header(count=None), "a string count": with_header(count="6"),
               "a count of 2**40": with_header(count=2**40), "cut short": good[:-3], "empty": b"",
               "a list header": b"imgprep-archive-index/2\n[1, 2]\n" + body}
    for what, damaged in damages.items():
        _replace(index_file, damaged)
        capsys.readouterr()
        source = open_source(archive, show_progress=False)
        assert [source.read(name) for name in names] == [(folder / name).read_bytes() for name in names], what
        assert "warning: the cached index" in capsys.readouterr().err, what
        assert index_file.read_bytes() == good, what
    # a FIFO where the index belongs is no index either, and never a hang
    index_file.unlink()
    os.mkfifo(index_file)
    assert open_source(archive, show_progress=False).read(names[0]) == (folder / names[0]).read_bytes()
    assert index_file.read_bytes() == good


def test_a_damaged_devkit_is_an_error_naming_it(sample_tree, download, tmp_path):
    """A block whose bytes changed but still inflate (here a stored block): only the gzip CRC tells."""
    import gzip
    import subprocess

    folder = tmp_path / "download"
    folder.mkdir()
    for name in (TRAIN_TAR, VAL_TAR):
        os.link(download / name, folder / name)
    truth = (sample_tree.root / "ILSVRC2012_validation_ground_truth.txt").read_bytes()
    lines = truth.split(b"\n")
    other = next(line for line in lines[1:] if len(line) == len(lines[0]) and line != lines[0])
    packed = gzip.compress(gzip.decompress((download / DEVKIT_TAR).read_bytes()), compresslevel=0, mtime=0)
    assert packed.count(truth) == 1
    (folder / DEVKIT_TAR).write_bytes(packed.replace(truth, b"\n".join([other, *lines[1:]])))
    checked = subprocess.run(["gzip", "-t", str(folder / DEVKIT_TAR)], capture_output=True, text=True)
    assert checked.returncode != 0 and "crc error" in checked.stderr.lower()
    assert_clean_error(run_cli("make-lists", folder, "--out", tmp_path / "lists", check=False),
                       str(folder / DEVKIT_TAR), "damaged", "CRC", "fetch it again")
    assert not (tmp_path / "lists" / "val.txt").exists()


def _class_tars(tree, classes, out, *tar_args):
    """The train tar of a tree's class folders, each packed by GNU tar (`tar_args` added) as
    `<wnid>.tar` holding its flat files, like ILSVRC2012's."""
    import subprocess

    (out / "classes").mkdir(parents=True)
    for wnid in classes:
        files = sorted(os.listdir(tree / "train" / wnid))
        subprocess.run(["tar", *tar_args, "-cf", str(out / "classes" / f"{wnid}.tar"), "-C", str(tree / "train" / wnid),
                        *files], check=True)
    subprocess.run(["tar", "-cf", str(out / TRAIN_TAR), "-C", str(out / "classes"), *[f"{w}.tar" for w in classes]],
                   check=True)
    return out / TRAIN_TAR


def _small_train_tree(sample_tree, tmp_path, per_class=3):
    """Two classes of the sample's plain train images, as a folder."""
    classes = sorted(os.listdir(sample_tree.root / "train"))[:2]
    tree = tmp_path / "tree"
    for wnid in classes:
        (tree / "train" / wnid).mkdir(parents=True)
        plain = [n for n in sorted(os.listdir(sample_tree.root / "train" / wnid))
                 if f"{wnid}/{n}" not in sample_tree.oddities][:per_class]
        for name in plain:
            shutil.copy(sample_tree.root / "train" / wnid / name, tree / "train" / wnid / name)
    return classes, tree


def test_hard_links_read_their_targets_data_and_symbolic_links_are_failures(sample_tree, tmp_path):
    classes, tree = _small_train_tree(sample_tree, tmp_path)
    first = sorted(os.listdir(tree / "train" / classes[0]))[0]
    os.link(tree / "train" / classes[0] / first, tree / "train" / classes[0] / f"{classes[0]}_99999.JPEG")
    second = tree / "train" / classes[1]
    os.symlink(sorted(os.listdir(second))[0], second / f"{classes[1]}_99999.JPEG")
    archive = _class_tars(tree, classes, tmp_path / "download")
    run_cli("make-lists", tree, "--out", tmp_path / "from-tree")
    run_cli("make-lists", archive, "--out", tmp_path / "from-tar")
    listed = (tmp_path / "from-tree" / "train.txt").read_text()
    assert (tmp_path / "from-tar" / "train.txt").read_text() == listed and len(listed.splitlines()) == 8
    train = tmp_path / "from-tree" / "train.txt"
    run_cli("build-lmdb", train, tree / "train", tmp_path / "tree-db", "--preset", "resnet")
    assert run_cli("build-lmdb", train, archive, tmp_path / "tar-db", "--preset", "resnet", check=False).returncode == 3
    link = f"{classes[1]}/{classes[1]}_99999.JPEG".encode()
    assert db_records(tmp_path / "tar-db") == [r for r in db_records(tmp_path / "tree-db") if not r[0].endswith(link)]
    [failure] = read_failures(tmp_path / "tar-db")
    assert failure.path == link.decode() and failure.reason == "not-a-file" and "symbolic link" in failure.detail


def test_list_paths_with_dot_slash_or_double_slash_read_the_same_from_an_archive(sample_tree, download, tmp_path):
    lines = (sample_tree.lists / "train.txt").read_text().splitlines()
    plain = [line for line in lines if line.rsplit(" ", 1)[0] not in sample_tree.oddities][:4]
    spelled = [f"./{plain[0]}", plain[1].replace("/", "//"), plain[2].replace("/", "/./"), f".//{plain[3]}"]
    listing = tmp_path / "aliases.txt"
    listing.write_text("".join(f"{line}\n" for line in spelled))
    run_cli("build-lmdb", listing, sample_tree.root / "train", tmp_path / "tree", "--preset", "resnet")
    result = run_cli("build-lmdb", listing, download / TRAIN_TAR, tmp_path / "tar", "--preset", "resnet")
    records = db_records(tmp_path / "tar")
    assert records == db_records(tmp_path / "tree") and len(records) == 4 and not read_failures(tmp_path / "tar")
    assert records[0][0] == f"00000000_./{plain[0].rsplit(' ', 1)[0]}".encode()  # the key as the list writes it
    assert "complete: 4 records" in result.stderr or "4 records" in result.stderr
    # and member names spelled so in the archive
    names = [line.rsplit(" ", 1)[0].split("/")[1] for line in plain]
    images = [(sample_tree.root / "train" / line.rsplit(" ", 1)[0]).read_bytes() for line in plain]
    odd = tmp_path / "odd.tar"
    _pack(odd, [(f"./{names[0]}", images[0]), (f"sub//{names[1]}", images[1]), (f"sub/./{names[2]}", images[2])])
    source = open_source(odd, show_progress=False)
    assert source.members() == [names[0], f"sub/{names[1]}", f"sub/{names[2]}"]
    assert source.read(f"sub//{names[1]}") == images[1] and source.read(f"./sub/{names[2]}") == images[2]


def _sparse_image(image: bytes, path) -> None:
    """An image with a 64 KiB hole after it and a tail after the hole (bytes after the JPEG end, which
    decoders ignore): a sparse file, as `tar --sparse` stores it."""
    with open(path, "wb") as f:
        f.write(image)
        f.seek(len(image) + (1 << 16) + (-len(image) % 4096))
        f.write(b"tail" * 1024)


@pytest.mark.parametrize("tar_format", ["gnu", "posix"])
def test_a_sparse_member_is_read_whole(sample_tree, tmp_path, tar_format):
    import tarfile

    classes, tree = _small_train_tree(sample_tree, tmp_path, per_class=2)
    for wnid in classes:
        name = sorted(os.listdir(tree / "train" / wnid))[0]
        path = tree / "train" / wnid / name
        image = path.read_bytes()
        path.unlink()
        _sparse_image(image, path)
    holes = os.stat(path).st_blocks * 512 < os.stat(path).st_size
    archive = _class_tars(tree, classes, tmp_path / "download", "--sparse", f"--format={tar_format}")
    if not holes:
        pytest.skip("this file system stores no holes, so tar --sparse writes no sparse member")
    with tarfile.open(tmp_path / "download" / "classes" / f"{classes[0]}.tar") as tar:
        assert any(member.issparse() for member in tar)
    source = open_source(archive, show_progress=False)
    rel = f"{classes[0]}/{sorted(os.listdir(tree / 'train' / classes[0]))[0]}"
    assert source.read(rel) == (tree / "train" / rel).read_bytes()
    run_cli("make-lists", tree, "--out", tmp_path / "lists")
    train = tmp_path / "lists" / "train.txt"
    run_cli("build-lmdb", train, tree / "train", tmp_path / "tree-db", "--preset", "resnet")
    run_cli("build-lmdb", train, archive, tmp_path / "tar-db", "--preset", "resnet")
    assert db_records(tmp_path / "tar-db") == db_records(tmp_path / "tree-db")
    assert not read_failures(tmp_path / "tar-db") and len(db_records(tmp_path / "tar-db")) == 4


def test_a_gzip_compressed_class_tar_is_named_with_what_to_do(sample_tree, tmp_path):
    import gzip

    classes, tree = _small_train_tree(sample_tree, tmp_path, per_class=1)
    archive = _class_tars(tree, classes, tmp_path / "download")
    classes_dir = tmp_path / "download" / "classes"
    inner = classes_dir / f"{classes[0]}.tar"
    inner.write_bytes(gzip.compress(inner.read_bytes()))
    _pack(archive, [(f"{w}.tar", (classes_dir / f"{w}.tar").read_bytes()) for w in classes])
    result = run_cli("make-lists", archive, "--out", tmp_path / "lists", check=False)
    assert_clean_error(result, f"{classes[0]}.tar in {archive} is gzip-compressed", "plain tar", "gunzip")


def test_fifos_given_as_archive_devkit_or_label_file_are_errors_not_hangs(sample_tree, download, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    root = sample_tree.root
    truth = root / "ILSVRC2012_validation_ground_truth.txt"
    mat_fifo = tmp_path / "meta.mat"
    os.mkfifo(mat_fifo)
    for args in (["make-lists", fifo, "--out", tmp_path / "o"],
                 ["make-lists", download / TRAIN_TAR, download / VAL_TAR, fifo, "--out", tmp_path / "o"],
                 ["make-lists", root, "--out", tmp_path / "o", "--val-labels", fifo],
                 ["make-lists", root, "--out", tmp_path / "o", "--val-labels", truth, "--val-id-table", fifo],
                 ["make-lists", root, "--out", tmp_path / "o", "--val-labels", truth, "--val-id-table", mat_fifo],
                 ["make-lists", root, "--out", tmp_path / "o", "--synsets", fifo],
                 ["build-lmdb", sample_tree.lists / "val.txt", fifo, tmp_path / "db"],
                 ["resize", fifo, tmp_path / "dst", "--resize", "shorter:32"]):
        result = run_cli(*args, check=False, timeout=60)
        assert_clean_error(result, "FIFO")
    assert not (tmp_path / "o").exists() and not (tmp_path / "db").exists()
