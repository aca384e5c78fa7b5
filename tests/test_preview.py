import os

import numpy as np
from PIL import Image

from conftest import assert_clean_error, run_cli
from imgprep.formats.codec import encode_datum
from imgprep.loading.preview import CAPTION, PAD, TITLE, contact_sheet
from imgprep.formats.storage import open_writer


def red_and_green_db(path):
    """Two raw 300x260 records as Caffe stores them (BGR planar): pure red (label 0), pure green (label 1)."""
    records = []
    for label, rgb in enumerate(((255, 0, 0), (0, 255, 0))):
        bgr_planar = np.empty((3, 260, 300), np.uint8)
        bgr_planar[:] = np.array(rgb[::-1], np.uint8)[:, None, None]
        value = encode_datum(bgr_planar.tobytes(), label, 3, 260, 300, False)
        records.append((b"%08d_%d.JPEG" % (label, label), value))
    writer = open_writer(path, "lmdb")
    writer.put_batch(records)
    writer.close()
    return path


def tile_colour(sheet, row, column, tile):
    x = PAD + column * (tile + PAD) + tile // 2
    y = TITLE + row * (tile + CAPTION + PAD) + tile // 2
    return sheet.getpixel((x, y))


def test_preview_writes_the_grid_with_stored_and_policy_tiles_in_their_true_colours(tmp_path):
    db = red_and_green_db(tmp_path / "db")
    out = tmp_path / "sheet.png"
    result = run_cli("preview", db, out, "--policy", "ten-crop", "--tile", "64")
    assert str(out) in result.stdout
    sheet = Image.open(out).convert("RGB")
    assert sheet.size == (PAD + 11 * (64 + PAD), TITLE + 2 * (64 + CAPTION + PAD))  # stored + ten views, 2 rows
    for column in range(11):
        assert tile_colour(sheet, 0, column, 64) == (255, 0, 0) and tile_colour(sheet, 1, column, 64) == (0, 255, 0)
    train = tmp_path / "train.png"
    run_cli("preview", db, train, "--tile", "64")  # caffe: the stored record and three epochs' crops
    assert Image.open(train).size == (PAD + 4 * (64 + PAD), TITLE + 2 * (64 + CAPTION + PAD))
    assert_clean_error(run_cli("preview", db, train, check=False), "exists; pass --overwrite")
    run_cli("preview", db, train, "--eval", "--overwrite", "--count", "1")
    assert Image.open(train).size == (PAD + 2 * (160 + PAD), TITLE + 160 + CAPTION + PAD)


def test_a_channel_swap_is_visible_on_the_sheet():
    red = np.zeros((50, 50, 3), np.uint8)
    red[..., 0] = 255
    sheet = contact_sheet([(red, "0: red", [red, red[..., ::-1]])], "swap", tile=64)
    assert tile_colour(sheet, 0, 1, 64) == (255, 0, 0) and tile_colour(sheet, 0, 2, 64) == (0, 0, 255)


def test_under_torchrun_variables_each_row_shows_its_own_records_views(tmp_path):
    """preview reads the whole database whatever RANK and WORLD_SIZE say (a torchrun shell, a PyTorchJob
    pod): the stored record and the policy's views in a row are the same record."""
    import os

    db = red_and_green_db(tmp_path / "db")
    for rank, world in (("1", "2"), ("abc", "0")):
        out = tmp_path / f"sheet-{rank}.png"
        run_cli("preview", db, out, "--tile", "64", env={**os.environ, "RANK": rank, "WORLD_SIZE": world})
        sheet = Image.open(out).convert("RGB")
        assert sheet.size == (PAD + 4 * (64 + PAD), TITLE + 2 * (64 + CAPTION + PAD))
        for column in range(4):
            assert tile_colour(sheet, 0, column, 64) == (255, 0, 0) and tile_colour(sheet, 1, column, 64) == (0, 255, 0)


def test_preview_of_an_incomplete_build_needs_allow_partial(sample_tree, tmp_path):
    import json

    from imgprep.prepare.build import MANIFEST, BuildOptions, build_database
    from imgprep.formats.imageops import ImageSpec, parse_resize

    db = tmp_path / "db"
    build_database(sample_tree.lists / "val.txt", sample_tree.root / "val", db,
                   BuildOptions(jobs=2, spec=ImageSpec(parse_resize("squash:64x64"), encoded=False)),
                   show_progress=False)
    manifest = json.loads((db / MANIFEST).read_text())
    (db / MANIFEST).write_text(json.dumps({**manifest, "state": "building"}))
    out = tmp_path / "sheet.png"
    assert_clean_error(run_cli("preview", db, out, "--eval", check=False), "incomplete build", "--allow-partial")
    run_cli("preview", db, out, "--eval", "--count", "2", "--allow-partial")
    assert Image.open(out).size == (PAD + 2 * (160 + PAD), TITLE + 2 * (160 + CAPTION + PAD))


def test_preview_never_writes_through_a_link_and_replaces_its_sheet_by_a_rename(tmp_path):
    db = red_and_green_db(tmp_path / "db")
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"precious")
    (tmp_path / "sheet.png").symlink_to(victim)
    (tmp_path / "dangling.png").symlink_to(tmp_path / "made-through-the-link.png")
    for out, extra in ((tmp_path / "sheet.png", []), (tmp_path / "sheet.png", ["--overwrite"]),
                       (tmp_path / "dangling.png", [])):
        assert_clean_error(run_cli("preview", db, out, *extra, check=False), f"{out} is a symbolic link")
    assert victim.read_bytes() == b"precious" and not (tmp_path / "made-through-the-link.png").exists()
    out = tmp_path / "out.png"
    run_cli("preview", db, out, "--tile", "64", "--count", "1")
    os.link(out, tmp_path / "kept.png")  # a reader holding the old sheet keeps it whole
    old = out.read_bytes()
    run_cli("preview", db, out, "--tile", "64", "--overwrite")
    assert (tmp_path / "kept.png").read_bytes() == old and out.read_bytes() != old
    assert Image.open(out).size == (PAD + 4 * (64 + PAD), TITLE + 2 * (64 + CAPTION + PAD))
    assert not [name for name in os.listdir(tmp_path) if ".tmp" in name]
    assert_clean_error(run_cli("preview", db, tmp_path / "absent" / "x.png", check=False),
                       f"the folder {tmp_path / 'absent'} does not exist")
