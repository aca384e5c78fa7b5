import os
import shutil

import numpy as np
import pytest

from conftest import assert_clean_error, run_cli
from imgprep import ImgprepError
from imgprep.formats.lists import PACKAGE_ILSVRC12, SYNSET_WORDS_FILE, load_synset_words, load_synsets, read_list
from imgprep.prepare.make_lists import make_lists
from imgprep.prepare.sample import ID_TABLE_NAME, devkit_ids


def test_shipped_synsets_are_caffes():
    wnids = load_synsets()
    assert len(wnids) == 1000 and wnids == sorted(wnids)
    assert wnids[0] == "n01440764" and wnids[999] == "n15075141" and wnids[65] == "n01751748"
    words = load_synset_words()
    assert words["n01440764"] == "tench, Tinca tinca"
    first = SYNSET_WORDS_FILE.read_text().splitlines()[0]
    assert first == "n01440764 tench, Tinca tinca"


def read_pairs(path):
    return [tuple(line.rsplit(" ", 1)) for line in path.read_text().splitlines()]


def test_train_list_has_every_image_once_with_sorted_wnid_label(sample_tree):
    wnids = load_synsets()
    pairs = read_pairs(sample_tree.lists / "train.txt")
    on_disk = sorted(f"{d}/{f}" for d in os.listdir(sample_tree.root / "train")
                     for f in os.listdir(sample_tree.root / "train" / d))
    assert sorted(p for p, _ in pairs) == on_disk
    assert [p for p, _ in pairs] == sorted(p for p, _ in pairs)
    for path, label in pairs:
        assert wnids[int(label)] == path.split("/")[0]


def test_every_val_label_source_agrees(sample_tree, tmp_path):
    root = sample_tree.root
    expected = read_pairs(sample_tree.lists / "val.txt")
    assert len(expected) == 30
    sources = {
        "kaggle": ["--val-labels", root / "LOC_val_solution.csv"],
        "devkit+csv": ["--val-labels", root / "ILSVRC2012_validation_ground_truth.txt",
                       "--val-id-table", root / ID_TABLE_NAME],
    }
    # plain 'filename wnid' lines
    wnids = load_synsets()
    plain = tmp_path / "plain.txt"
    plain.write_text("".join(f"{p} {wnids[int(l)]}\n" for p, l in expected))
    sources["plain"] = ["--val-labels", plain]
    # the devkit's meta.mat, written with scipy as MATLAB would
    from scipy.io import savemat
    ids = devkit_ids(wnids)
    records = np.zeros(1000, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O")])
    for i, w in enumerate(wnids):
        records[i] = (ids[w], w, w)
    savemat(tmp_path / "meta.mat", {"synsets": records})
    sources["devkit+meta.mat"] = ["--val-labels", root / "ILSVRC2012_validation_ground_truth.txt",
                                  "--val-id-table", tmp_path / "meta.mat"]
    for name, args in sources.items():
        out = tmp_path / name
        run_cli("make-lists", root, "--out", out, *args)
        assert read_pairs(out / "val.txt") == expected, name
    # and a val tree already split into <wnid>/ folders
    split = tmp_path / "split"
    shutil.copytree(root / "train", split / "train")
    for path, label in expected:
        (split / "val" / wnids[int(label)]).mkdir(parents=True, exist_ok=True)
        shutil.copy(root / "val" / path, split / "val" / wnids[int(label)] / path)
    make_lists(split, tmp_path / "folders", show_progress=False)
    folder_pairs = read_pairs(tmp_path / "folders" / "val.txt")
    assert sorted((p.split("/")[1], l) for p, l in folder_pairs) == sorted(expected)


def test_val_labels_are_not_devkit_ids(sample_tree):
    """Label = index in the sorted wnids, never ILSVRC2012_ID - 1."""
    truth = (sample_tree.root / "ILSVRC2012_validation_ground_truth.txt").read_text().split()
    labels = [int(l) for _, l in read_pairs(sample_tree.lists / "val.txt")]
    assert any(int(t) - 1 != l for t, l in zip(truth, labels))


def test_derive_synsets_and_custom_synsets(tmp_path):
    root = tmp_path / "flowers"
    for cls in ("tulip", "rose", "daisy"):
        (root / "train" / cls).mkdir(parents=True)
        (root / "train" / cls / "a.jpg").write_bytes(b"x")
    make_lists(root, tmp_path / "out", derive_synsets=True, show_progress=False)
    assert read_pairs(tmp_path / "out" / "train.txt") == [
        ("daisy/a.jpg", "0"), ("rose/a.jpg", "1"), ("tulip/a.jpg", "2")]
    assert (tmp_path / "out" / "synsets.txt").read_text() == "daisy\nrose\ntulip\n"
    custom = tmp_path / "syn.txt"
    custom.write_text("tulip\nrose\ndaisy\n")
    make_lists(root, tmp_path / "out2", synsets_file=custom, show_progress=False)
    assert read_pairs(tmp_path / "out2" / "train.txt")[0] == ("daisy/a.jpg", "2")


def test_unknown_wnid_folder_is_named(tmp_path):
    (tmp_path / "r" / "train" / "n99999999").mkdir(parents=True)
    result = run_cli("make-lists", tmp_path / "r", "--out", tmp_path / "o", check=False)
    assert_clean_error(result, "n99999999", "--derive-synsets")


def test_val_problems_are_reported(tree_copy, tmp_path):
    (tree_copy / "val" / "ILSVRC2012_val_00000999.JPEG").write_bytes(b"x")
    result = run_cli("make-lists", tree_copy, "--out", tmp_path / "o", check=False)
    assert_clean_error(result, "1 val image has no label", "ILSVRC2012_val_00000999.JPEG")
    os.remove(tree_copy / "val" / "ILSVRC2012_val_00000999.JPEG")
    os.remove(tree_copy / "val" / "ILSVRC2012_val_00000002.JPEG")
    result = run_cli("make-lists", tree_copy, "--out", tmp_path / "o", check=False)
    assert_clean_error(result, "not in", "ILSVRC2012_val_00000002")


def test_empty_class_warns_and_non_images_are_skipped(tree_copy, tmp_path):
    (tree_copy / "train" / "n01440764" / "notes.txt").write_text("hi")
    (tree_copy / "train" / "n15075141").mkdir()
    result = run_cli("make-lists", tree_copy, "--out", tmp_path / "o")
    assert "class n15075141 has no images" in result.stderr
    assert "skipped 1 non-image" in result.stdout
    assert "notes.txt" not in (tmp_path / "o" / "train.txt").read_text()


def test_test_folder_gets_label_zero(tree_copy, tmp_path):
    (tree_copy / "test").mkdir()
    shutil.copy(tree_copy / "val" / "ILSVRC2012_val_00000001.JPEG", tree_copy / "test" / "t1.JPEG")
    make_lists(tree_copy, tmp_path / "o", show_progress=False)
    assert (tmp_path / "o" / "test.txt").read_text() == "t1.JPEG 0\n"


def test_read_list_normalises_and_keeps_spaces_in_paths(tmp_path):
    path = tmp_path / "list.txt"
    path.write_bytes(b"\xef\xbb\xbfa b/c d.JPEG 3\r\n\r\nx.JPEG 4  \nnon-utf8-\xff.JPEG 5\n")
    parsed = read_list(path)
    assert parsed.paths == ["a b/c d.JPEG", "x.JPEG", "non-utf8-\udcff.JPEG"]
    assert parsed.labels.tolist() == [3, 4, 5]
    assert any("byte-order mark" in n for n in parsed.notes)
    assert any("blank" in n for n in parsed.notes)


@pytest.mark.parametrize("line, message", [
    ("a.JPEG", "missing label"),
    ("a.JPEG x1", "not an integer"),
    ("a.JPEG 1.5", "not an integer"),
    ("a.JPEG -1", "negative label"),
    ("/etc/passwd 1", "absolute path"),
    ("../../secret.JPEG 1", "escapes the image root"),
    ("ok.JPEG 1\nok.JPEG 2", "duplicate of entry 1"),
    ("a.JPEG\t3", "missing label"),
])
def test_bad_list_lines_are_refused_with_their_line_number(tmp_path, line, message):
    path = tmp_path / "list.txt"
    path.write_text(line + "\n")
    with pytest.raises(ImgprepError, match=message):
        read_list(path)


def test_out_of_range_label(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("a.JPEG 1000\n")
    with pytest.raises(ImgprepError, match="out of range"):
        read_list(path, num_labels=1000)


def test_every_command_has_help_with_an_example():
    top = run_cli("--help")
    commands = [line.split()[0] for line in top.stdout.split("Commands:")[1].splitlines() if line.strip()]
    assert {"make-lists", "build-lmdb", "sample", "doctor"} <= set(commands)
    for command in commands:
        text = run_cli(command, "--help").stdout
        assert "Example" in text, command


@pytest.mark.parametrize("text, message", [
    ("d/x.JPEG 1\nd/./x.JPEG 1", "entry 2: duplicate of entry 1 ('d/x.JPEG')"),
    ("./d/x.JPEG 1\nd//x.JPEG 2\nd/e/../x.JPEG 3", "entry 3: duplicate of entry 1"),
    ("a.JPEG \uff10", "not an integer"),  # fullwidth zero
    ("a.JPEG \u0663", "not an integer"),  # Arabic-Indic three
    ("a\0b.JPEG 1", "line 1: path contains a NUL byte"),
    ("a.JPEG 0\rb.JPEG 1\rc.JPEG 2", "line 1: path contains a carriage return"),  # CR-only line ends
])
def test_path_aliases_non_ascii_labels_and_nul_bytes_are_refused(tmp_path, text, message):
    path = tmp_path / "list.txt"
    path.write_text(text + "\n", encoding="utf-8")
    with pytest.raises(ImgprepError) as info:
        read_list(path)
    assert message in str(info.value)


def test_lists_never_go_into_the_package_data(tree_copy, tmp_path):
    before = {p.name: p.read_bytes() for p in PACKAGE_ILSVRC12.iterdir()}
    link = tmp_path / "data" / "ilsvrc12"  # as a checkout's data/ilsvrc12 link to the package data
    link.parent.mkdir()
    link.symlink_to(PACKAGE_ILSVRC12)
    try:
        for out in (link, PACKAGE_ILSVRC12):
            result = run_cli("make-lists", tree_copy, "--out", out, "--derive-synsets", check=False)
            assert_clean_error(result, "inside the imgprep package")
        assert {p.name: p.read_bytes() for p in PACKAGE_ILSVRC12.iterdir()} == before
    finally:  # keep the package whole even when this test fails
        for p in PACKAGE_ILSVRC12.iterdir():
            if p.name not in before:
                p.unlink()
            elif p.read_bytes() != before[p.name]:
                p.write_bytes(before[p.name])


def test_a_failed_make_lists_leaves_the_previous_lists_whole(tree_copy, tmp_path):
    out = tmp_path / "lists"
    run_cli("make-lists", tree_copy, "--out", out)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    shutil.copy(tree_copy / "val" / "ILSVRC2012_val_00000001.JPEG", tree_copy / "train" / "n01440764" / "a\nb.JPEG")
    assert_clean_error(run_cli("make-lists", tree_copy, "--out", out, check=False), "line break")
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


def test_lists_made_again_need_no_flag_and_other_files_in_out_are_replaced_only_with_overwrite(tree_copy, tmp_path):
    out = tmp_path / "lists"
    run_cli("make-lists", tree_copy, "--out", out)
    made = {name: (out / name).read_bytes() for name in os.listdir(out)}
    run_cli("make-lists", tree_copy, "--out", out)  # the same bytes again: nothing is lost
    (out / "train.txt").write_bytes(made["train.txt"].split(b"\n", 1)[1])  # a list the user edited
    edited = {name: (out / name).read_bytes() for name in os.listdir(out)}
    for args in ([], ["--derive-synsets"]):
        result = run_cli("make-lists", tree_copy, "--out", out, *args, check=False)
        assert_clean_error(result, f"{out} already holds train.txt", "--overwrite")
        assert {name: (out / name).read_bytes() for name in os.listdir(out)} == edited  # nothing of the set replaced
    run_cli("make-lists", tree_copy, "--out", out, "--overwrite")
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == made
    (out / "val.txt").unlink()
    (out / "val.txt").mkdir()  # a folder where a list goes: refused before any file is replaced, flag or not
    (out / "train.txt").write_bytes(b"mine")
    assert_clean_error(run_cli("make-lists", tree_copy, "--out", out, "--overwrite", check=False),
                       f"{out / 'val.txt'} is a folder")
    assert (out / "train.txt").read_bytes() == b"mine" and sorted(os.listdir(out)) == sorted(made)


def test_label_files_in_other_encodings_are_named_with_the_encoding_expected(sample_tree, tmp_path):
    root = sample_tree.root
    utf16 = tmp_path / "LOC_val_solution.csv"
    utf16.write_text((root / "LOC_val_solution.csv").read_text(), encoding="utf-16")
    latin1 = tmp_path / "ids.csv"
    latin1.write_bytes((root / ID_TABLE_NAME).read_bytes().replace(b"WNID", b"WNID \xe9t\xe9"))
    synsets = tmp_path / "synsets.txt"
    synsets.write_bytes("".join(f"{w}\n" for w in load_synsets()).encode() + b"caf\xe9\n")
    cases = [
        (["--val-labels", utf16], ["val labels file", str(utf16), "not UTF-8", "UTF-16"]),
        (["--val-labels", root / "ILSVRC2012_validation_ground_truth.txt", "--val-id-table", latin1],
         ["ID table", str(latin1), "not UTF-8", "0xe9"]),
        (["--synsets", synsets], ["synsets file", str(synsets), "not UTF-8"]),
    ]
    for args, fragments in cases:
        result = run_cli("make-lists", root, "--out", tmp_path / "o", *args, check=False)
        assert_clean_error(result, *fragments)
    superscript = tmp_path / "truth.txt"
    superscript.write_text("1\n\u00b2\n", encoding="utf-8")  # str.isdigit() is true for '²', int() fails
    assert_clean_error(run_cli("make-lists", root, "--out", tmp_path / "o", "--val-labels", superscript,
                               check=False), str(superscript))


@pytest.mark.parametrize("folder", ["n01 440764", "n01440764\tcopy", "n01440764\x0bv", b"n0144\xff".decode(
    "utf-8", "surrogateescape")])
def test_derived_synsets_refuse_class_folders_that_synsets_txt_cannot_hold(sample_tree, tmp_path, folder):
    """synsets.txt holds one class a line and --synsets reads a line up to its first blank: such a
    folder would come back as another class (or not at all)."""
    root = tmp_path / "tree"
    image = next((sample_tree.root / "val").iterdir()).read_bytes()
    for wnid in ("n01440764", folder):
        (root / "train" / wnid).mkdir(parents=True)
        (root / "train" / wnid / "a.JPEG").write_bytes(image)
    result = run_cli("make-lists", root, "--out", tmp_path / "lists", "--derive-synsets", check=False)
    assert_clean_error(result, "--derive-synsets", repr(folder), "rename")
    assert not (tmp_path / "lists").exists()


def test_a_devkit_table_of_the_wrong_shape_is_a_clear_error_naming_it(sample_tree, tmp_path):
    from scipy.io import savemat

    wnids = load_synsets()
    ids = devkit_ids(wnids)

    def synsets(fields, value):
        records = np.zeros(len(wnids), dtype=[(f, "O") for f in fields])
        for i, w in enumerate(wnids):
            records[i] = tuple(value(ids[w], w)[f] for f in fields)
        return records

    tables = {
        "no ILSVRC2012_ID": ({"synsets": synsets(["WNID"], lambda i, w: {"WNID": w})}, "ILSVRC2012_ID"),
        "numeric synsets": ({"synsets": np.arange(1000.0)}, "not a struct"),
        "IDs as text": ({"synsets": synsets(["ILSVRC2012_ID", "WNID"],
                                            lambda i, w: {"ILSVRC2012_ID": f"id{i}", "WNID": w})}, "not an integer"),
        "fractional IDs": ({"synsets": synsets(["ILSVRC2012_ID", "WNID"],
                                               lambda i, w: {"ILSVRC2012_ID": i + 0.5, "WNID": w})}, "not an integer"),
        "repeated IDs": ({"synsets": synsets(["ILSVRC2012_ID", "WNID"],
                                             lambda i, w: {"ILSVRC2012_ID": 1, "WNID": w})}, "repeats"),
        "no synsets": ({"other": np.arange(3)}, "no variable `synsets`"),
    }
    for what, (variables, message) in tables.items():
        table = tmp_path / f"{what}.mat"
        savemat(table, variables)
        result = run_cli("make-lists", sample_tree.root, "--out", tmp_path / "lists", "--val-labels",
                         sample_tree.root / "ILSVRC2012_validation_ground_truth.txt", "--val-id-table", table,
                         check=False)
        assert_clean_error(result, str(table), message)


LIST_CASES = {
    "clean": "a/x.JPEG 0\nb/y z.JPEG 12\nc/w.png 3\n",
    "byte-order mark": "\ufeffa/x.JPEG 0\nb/y.JPEG 1\n",
    "CRLF": "a/x.JPEG 0\r\nb/y.JPEG 1\r\n",
    "trailing blanks": "a/x.JPEG 0  \nb/y.JPEG 1\t\n",
    "blank lines": "a/x.JPEG 0\n\n   \nb/y.JPEG 1\n",
    "no last LF": "a/x.JPEG 0\nb/y.JPEG 1",
    "plus sign": "a/x.JPEG +5\n",
    "duplicate": "a/x.JPEG 0\nb/y.JPEG 1\na/x.JPEG 2\n",
    "alias": "a/x.JPEG 0\na/./x.JPEG 1\n",
    "double slash": "a//x.JPEG 0\nb/y.JPEG 1\n",
    "dot start": "./a/x.JPEG 0\nb/y.JPEG 1\n",
    "escape": "../x.JPEG 0\n",
    "dotted name": "a/x..JPEG 0\n",
    "absolute": "a/x.JPEG 0\n/abs/y.JPEG 1\n",
    "no label": "a/x.JPEG 0\nb/y.JPEG\n",
    "space only label": "a/x.JPEG \n",
    "too large": "a/x.JPEG 4294967296\n",
    "beyond int64": "a/x.JPEG 9223372036854775808\n",
    "out of range": "a/x.JPEG 1000\n",
    "arabic digit": "a/x.JPEG \u0663\n",
    "NUL": "a/x\0.JPEG 0\n",
}


@pytest.mark.parametrize("case", sorted(LIST_CASES))
def test_whole_text_checks_agree_with_the_line_by_line_ones(tmp_path, monkeypatch, case):
    """read_list checks a clean list on its whole text at once, and every other line by line: both
    ways give the same entries, notes and errors, for every kind of line the checks care about."""
    import imgprep.formats.lists as lists

    path = tmp_path / "list.txt"
    path.write_bytes(LIST_CASES[case].encode("utf-8", "surrogateescape"))

    def outcome():
        try:
            parsed = read_list(path, num_labels=1000)
        except ImgprepError as e:
            return "error", str(e)
        return parsed.paths, parsed.labels.tolist(), parsed.labels.dtype, parsed.notes

    quick = outcome()
    monkeypatch.setattr(lists, "_read_clean", lambda f, num_labels, allow_outside_root: None)
    assert quick == outcome()
    if case in ("clean", "byte-order mark"):
        monkeypatch.undo()
        with open(path, "rb") as f:
            assert lists._read_clean(f, 1000, False) is not None  # the quick way took these
