import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import assert_clean_error, run_cli
from imgprep.loading.bench import BenchRow, format_table
from imgprep.prepare.build import BuildOptions, build_database
from imgprep.formats.imageops import ImageSpec
from imgprep.formats.resizing import parse_resize


@pytest.fixture(scope="module")
def val_db(sample_tree, tmp_path_factory):
    db = tmp_path_factory.mktemp("benchdb") / "db"
    options = BuildOptions(jobs=2, shuffle=True, spec=ImageSpec(parse_resize("shorter:256"), encoded=True))
    build_database(sample_tree.lists / "val.txt", sample_tree.root / "val", db, options, show_progress=False)
    return db


def test_bench_loader_runs_on_cpu_with_its_peers(sample_tree, val_db):
    result = run_cli("bench-loader", val_db, "--batch", "8", "--seconds", "0.5", "--threads", "2",
                     "--compare", sample_tree.root / "val", "--compare-list", sample_tree.lists / "val.txt",
                     "--torch-workers", "2", "--json")
    rows = {row["source"]: row for row in json.loads(result.stdout)}
    names = list(rows)
    assert names[0] == "imgprep loader (training policy, cpu)" and rows[names[0]]["images_per_s"] > 0
    assert rows["same LMDB, read + decode only"]["images_per_s"] > 0
    assert rows["imgprep CaffeDataset, same DB, DataLoader with 2 workers"]["images_per_s"] > 0
    assert any(name.startswith("DALI file reader") and rows[name]["images_per_s"] > 0 for name in names)
    torch_rows = [name for name in names if name.startswith("torchvision")]
    assert len(torch_rows) == 2 and "RandomResizedCrop" in torch_rows[1]
    assert all(rows[name]["images_per_s"] > 0 for name in torch_rows), rows  # with or without torchvision
    table = run_cli("bench-loader", val_db, "--batch", "8", "--seconds", "0.3", "--eval",
                    "--cpu-share", "0.4", "--torch-workers", "0").stdout
    assert "| imgprep loader (eval policy, cpu) |" in table
    assert "| imgprep loader, 40% of records decoded on CPU threads |" in table
    assert "| imgprep CaffeDataset, same DB, DataLoader with 0 workers |" in table


def peer_rows(*args):
    rows = json.loads(run_cli("bench-loader", *args, "--batch", "8", "--seconds", "0.2", "--threads", "2",
                              "--json", timeout=300).stdout)
    return {row["source"]: row for row in rows}


def test_a_peer_that_cannot_run_says_why_and_shows_no_rate(sample_tree, val_db, tmp_path):
    (tmp_path / "empty" / "n01440764").mkdir(parents=True)
    rows = peer_rows(val_db, "--compare", tmp_path / "empty", "--torch-workers", "0")
    failed = [row for row in rows.values() if row["images_per_s"] is None]
    assert len(failed) == 3
    assert all(f"cannot run: no images in {tmp_path / 'empty'}'s class subfolders" in row["note"] for row in failed)
    # folders of nothing but zero-byte files, or random bytes named .JPEG: every file is skipped, and said
    for name, data, reason in (("zero-byte", b"", "empty"), ("junk", os.urandom(5000), "unreadable")):
        (tmp_path / name / "n01440764").mkdir(parents=True)
        for i in range(8):  # one batch
            (tmp_path / name / "n01440764" / f"x{i}.JPEG").write_bytes(data)
        rows = peer_rows(val_db, "--compare", tmp_path / name, "--torch-workers", "1")
        peers = [row for peer, row in rows.items() if peer.startswith(("DALI file reader", "torchvision"))]
        assert len(peers) == 3
        for row in peers:
            assert row["images_per_s"] is None and row["batch"] == 0, row
            assert row["note"] == (f"cannot run: no readable images in {tmp_path / name}'s class subfolders "
                                   f"(ROOT/<class>/<image>); skipped 8 unreadable files ({reason} 8)"), row
        table = format_table([BenchRow(**row) for row in rows.values()])
        assert "| - | - | - | - | cannot run: no readable images" in table and "| 0 |" not in table


def test_a_peers_own_failure_is_said_in_words_a_user_understands(tmp_path):
    """A file the quick check passes can still stop a peer: DALI's and a DataLoader worker's errors
    are reduced to their cause (no C++ context, no worker traceback)."""
    from imgprep.loading.bench import explain_failure, file_reader_pipeline, folder_step
    from imgprep.loading.peers import PillowTransform

    junk = [(str(tmp_path / f"x{i}.JPEG"), 0) for i in range(2)]
    for path, _ in junk:
        Path(path).write_bytes(b"")
    step = folder_step(junk, 2, 1, False, PillowTransform(False, False, (0, 0, 0), (1, 1, 1)))
    with pytest.raises(Exception) as error:
        step()
    step.close()
    said = explain_failure(error.value)
    assert said.startswith("a DataLoader worker failed: Pillow cannot read") and "Traceback" not in said, said
    with pytest.raises(Exception) as error:
        file_reader_pipeline(junk, 2, 1, False, False).run()
    said = explain_failure(error.value)
    assert "File mapping failed" in said and "empty file" in said and "no longer valid" not in said, said


def test_bench_loader_compare_runs_on_the_sample_with_oddities(tmp_path):
    """The README's --compare example on `imgprep sample --oddities`, through the CLI: every row runs
    with a batch of all the images (fewer than the default 256), the unreadable originals are skipped
    and counted, and the ratio column names the row it compares against."""
    root, lists, db = tmp_path / "sample", tmp_path / "lists", tmp_path / "train_lmdb"
    run_cli("sample", root, "--oddities", "--classes", "3", "--train-per-class", "5")  # 15 + 7 oddities
    run_cli("make-lists", root, "--out", lists)
    build = run_cli("build-lmdb", lists / "train.txt", root / "train", db, "--preset", "resnet", check=False)
    assert build.returncode in (0, 3), build.stderr
    args = ("--compare", root / "train", "--seconds", "0.2", "--threads", "2", "--torch-workers", "0")
    rows = json.loads(run_cli("bench-loader", db, *args, "--json", timeout=300).stdout)
    assert len(rows) == 6 and all(row["images_per_s"] > 0 for row in rows), rows
    skipped = "skipped 3 unreadable files (empty 1, truncated 1, unreadable 1)"
    for row in rows:
        originals = row["source"].startswith(("DALI file reader", "torchvision"))
        assert row["batch"] == 19, row  # 22 files, 3 unreadable; the database holds the same 19
        assert (skipped in row["note"]) == originals, row
        assert f"a batch of all 19 {'readable images' if originals else 'records'} (fewer than 256)" in row["note"]
    table = run_cli("bench-loader", db, *args, timeout=300).stdout.splitlines()
    assert table[0] == "| source | batch | img/s | ms/batch | x imgprep loader (training policy, cpu) | note |"
    assert table[2].startswith("| imgprep loader (training policy, cpu) | 19 | ") and "| 1.00 |" in table[2]


def test_caffe_dataset_row_on_leveldb_with_several_workers_says_why(sample_tree, tmp_path):
    options = BuildOptions(backend="leveldb", jobs=2, spec=ImageSpec(parse_resize("shorter:256"), encoded=True))
    build_database(sample_tree.lists / "val.txt", sample_tree.root / "val", tmp_path / "db", options,
                   show_progress=False)
    rows = peer_rows(tmp_path / "db", "--torch-workers", "2")
    row = rows["imgprep CaffeDataset, same DB, DataLoader with 2 workers"]
    assert row["images_per_s"] is None and "LevelDB allows one process at a time" in row["note"]
    assert "--torch-workers 0 or 1" in row["note"]


def test_bench_loader_on_a_non_database_is_a_clear_error(tmp_path):
    assert_clean_error(run_cli("bench-loader", tmp_path, check=False), "neither an LMDB")


def test_the_torchvision_style_transforms_are_torchvisions():
    import random

    import numpy as np
    from PIL import Image

    from imgprep.loading.peers import PillowTransform, center_box, random_box, random_resized_box, resize_shorter

    assert resize_shorter(Image.new("RGB", (500, 375)), 256).size == (341, 256)  # int(256 * 500 / 375)
    assert resize_shorter(Image.new("RGB", (333, 500)), 256).size == (256, 384)
    assert center_box(341, 256, 224) == (58, 16, 282, 240)  # round((341 - 224) / 2) = 58
    rng = random.Random(0)
    for _ in range(200):
        left, top, right, bottom = random_box(341, 256, 224, rng)
        assert 0 <= left <= 117 and 0 <= top <= 32 and (right - left, bottom - top) == (224, 224)
        left, top, right, bottom = random_resized_box(500, 375, rng)
        w, h = right - left, bottom - top
        assert 0 <= left and right <= 500 and 0 <= top and bottom <= 375
        assert 0.08 * 500 * 375 * 0.95 <= w * h <= 500 * 375 and 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05
    # nothing fits in 10 tries: the center crop of the widest allowed ratio, round(100 * 4 / 3) = 133 wide
    assert random_resized_box(2000, 100, rng) == (933, 0, 1066, 100)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8))
    mean, std = (120.0, 110.0, 100.0), (60.0, 50.0, 40.0)
    expected = np.asarray(resize_shorter(image, 256).crop((58, 16, 282, 240)), np.float32) / 255
    expected = (expected - np.array(mean, np.float32) / 255) / (np.array(std, np.float32) / 255)
    np.testing.assert_allclose(PillowTransform(False, False, mean, std)(image).numpy(),
                               expected.transpose(2, 0, 1), atol=1e-5)
    for resized_crop in (False, True):
        assert PillowTransform(True, resized_crop, mean, std)(image).shape == (3, 224, 224)


def test_bench_loader_measures_each_policy_side_by_side(val_db):
    rows = json.loads(run_cli("bench-loader", val_db, "--batch", "4", "--seconds", "0.2", "--threads", "1",
                              "--policy", "all", "--torch-workers", "0", "--json").stdout)
    loader_rows = [row for row in rows if row["source"].startswith("imgprep loader (")]
    assert [row["source"] for row in loader_rows] == [f"imgprep loader ({name} policy, cpu)" for name in
                                                      ("caffe", "resnet", "inception", "center", "ten-crop")]
    assert all(row["images_per_s"] > 0 for row in loader_rows) and "10 views" in loader_rows[-1]["note"]
    assert_clean_error(run_cli("bench-loader", val_db, "--policy", "alexnet", check=False), "unknown policy 'alexnet'")


def test_bench_loader_ignores_torchrun_variables_and_takes_allow_partial(val_db, tmp_path):
    """It measures the whole database as one shard whatever RANK and WORLD_SIZE say, and an incomplete
    build is refused with the --allow-partial it offers."""
    import shutil

    from imgprep.formats.manifest import MANIFEST

    args = ("--batch", "4", "--seconds", "0.2", "--threads", "1", "--torch-workers", "0", "--json")
    env = {**os.environ, "RANK": "abc", "WORLD_SIZE": "0"}
    rows = json.loads(run_cli("bench-loader", val_db, *args, env=env).stdout)
    assert rows[0]["images_per_s"] > 0
    partial = tmp_path / "partial"
    shutil.copytree(val_db, partial)
    manifest = json.loads((partial / MANIFEST).read_text())
    (partial / MANIFEST).write_text(json.dumps({**manifest, "state": "building"}))
    assert_clean_error(run_cli("bench-loader", partial, *args, check=False), "incomplete build", "--allow-partial")
    rows = json.loads(run_cli("bench-loader", partial, *args, "--allow-partial").stdout)
    assert all(row["images_per_s"] > 0 for row in rows), rows  # the loader, the decode ceiling, CaffeDataset


def test_a_fifo_in_the_compare_list_is_named_never_waited_on(sample_tree, val_db, tmp_path):
    originals = tmp_path / "originals" / "n01440764"
    originals.mkdir(parents=True)
    for i, image in enumerate(sorted((sample_tree.root / "val").glob("*.JPEG"))[:8]):
        shutil.copy(image, originals / f"x{i}.JPEG")
    os.mkfifo(originals / "pipe.JPEG")  # a reader opening it would wait for a writer forever
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"n01440764/x{i}.JPEG 0\n" for i in range(8)) + "n01440764/pipe.JPEG 0\n")
    rows = peer_rows(val_db, "--compare", tmp_path / "originals", "--compare-list", listing, "--torch-workers", "0")
    peers = [row for name, row in rows.items() if name.startswith(("DALI file reader", "torchvision"))]
    assert len(peers) == 3
    for row in peers:
        assert row["images_per_s"] is None and f"{originals / 'pipe.JPEG'} is a FIFO" in row["note"], row
    assert rows["imgprep loader (training policy, cpu)"]["images_per_s"] > 0
