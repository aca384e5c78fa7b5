import os

import numpy as np
from PIL import Image

from conftest import assert_clean_error, run_cli
from imgprep.formats.codec import encode_datum
from imgprep.loading.preview import (CAPTION, CAPTION_FONT, CAPTION_LINE, CAPTION_LINES, ELLIPSIS, PAD, TITLE_FONT,
                                     TITLE_LINE, _font, contact_sheet, record_caption, sheet_layout, text_width,
                                     view_labels)
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


def grid_top(sheet, rows, tile):
    """Where the first row of tiles starts: under the title, which takes 8 + TITLE_LINE px a line."""
    top = sheet.height - rows * (tile + CAPTION + PAD)
    assert top >= 8 + TITLE_LINE and (top - 8) % TITLE_LINE == 0, top
    return top


def tile_colour(sheet, row, column, tile, rows):
    """The colour at the centre of the tile in `row`, `column` of a sheet of `rows` rows."""
    x = PAD + column * (tile + PAD) + tile // 2
    y = grid_top(sheet, rows, tile) + row * (tile + CAPTION + PAD) + tile // 2
    return sheet.getpixel((x, y))


def test_preview_writes_the_grid_with_stored_and_policy_tiles_in_their_true_colours(tmp_path):
    db = red_and_green_db(tmp_path / "db")
    out = tmp_path / "sheet.png"
    result = run_cli("preview", db, out, "--policy", "ten-crop", "--tile", "64")
    assert str(out) in result.stdout
    sheet = Image.open(out).convert("RGB")
    assert sheet.width == PAD + 11 * (64 + PAD)  # stored + ten views
    assert grid_top(sheet, 2, 64) == 8 + TITLE_LINE  # a one-line title, then 2 rows
    for column in range(11):
        assert tile_colour(sheet, 0, column, 64, 2) == (255, 0, 0)
        assert tile_colour(sheet, 1, column, 64, 2) == (0, 255, 0)
    train = tmp_path / "train.png"
    run_cli("preview", db, train, "--tile", "64")  # caffe: the stored record and three epochs' crops
    assert Image.open(train).width == PAD + 4 * (64 + PAD)
    grid_top(Image.open(train), 2, 64)
    assert_clean_error(run_cli("preview", db, train, check=False), "exists; pass --overwrite")
    run_cli("preview", db, train, "--eval", "--overwrite", "--count", "1")
    assert Image.open(train).width == PAD + 2 * (160 + PAD)
    grid_top(Image.open(train), 1, 160)


def test_a_channel_swap_is_visible_on_the_sheet():
    red = np.zeros((50, 50, 3), np.uint8)
    red[..., 0] = 255
    sheet = contact_sheet([(red, "0: red", [red, red[..., ::-1]])], "swap", tile=64)
    assert tile_colour(sheet, 0, 1, 64, 1) == (255, 0, 0) and tile_colour(sheet, 0, 2, 64, 1) == (0, 0, 255)


LONG_CLASS = "n02669723 academic gown, academic robe, judge's robe, hood, mortarboard, tassel, stole"


def ink_columns(sheet, box):
    """The x of every column in `box` (left, top, right, bottom) holding a pixel darker than light grey."""
    pixels = np.asarray(sheet.convert("L").crop(box))
    return {box[0] + x for x in np.nonzero((pixels < 200).any(axis=0))[0]}


def test_captions_keep_the_size_first_and_fit_their_tile_measured_in_the_font_used():
    """A long class name is cut with an ellipsis inside the tile's width; the stored size, first,
    is never what falls off."""
    rgb = np.zeros((375, 500, 3), np.uint8)
    names = ["x"] * 400 + [LONG_CLASS]
    caption = record_caption(rgb, 400, names)
    assert caption.startswith("500x375, label 400: n02669723 academic gown")
    small = _font(CAPTION_FONT)
    for tile in (64, 160):
        layout = sheet_layout([caption], 3, "t", tile)
        left, top = layout.tiles[0, 0]
        lines = [(x, y, text) for x, y, text, size, _ in layout.texts if size == CAPTION_FONT and x == left]
        assert 1 < len(lines) <= CAPTION_LINES and lines[0][2].startswith("500x375")
        assert lines[-1][2].endswith(ELLIPSIS)  # the words that did not fit are said to be cut
        for x, y, text in lines:
            assert text_width(text, small) <= tile and top + tile < y and y + CAPTION_LINE <= top + tile + CAPTION
        for x, y, text, size, width in layout.texts:  # every text, the view labels too, fits its width
            assert text_width(text, _font(size)) <= width
        # drawn: no ink of the caption beyond its tile, into the next column's band
        sheet = contact_sheet([(rgb, caption, [rgb] * 3)], "t", tile)
        band = (0, top + tile + 1, sheet.width, top + tile + CAPTION)
        ink = ink_columns(sheet, band)
        assert ink and max(ink) < left + tile, (tile, max(ink))


def test_the_title_fits_a_narrow_sheet():
    """A one-column sheet (the center crop, small tiles) wraps its title to the sheet's width; a word
    wider than the grid makes the sheet wider."""
    red = np.full((50, 50, 3), 200, np.uint8)
    title = "val_lmdb: first 1 records, then the 'center' policy (the crop, seed 0)"
    font = _font(TITLE_FONT)
    for title, tile in ((title, 64), ("a_database_name_much_wider_than_two_tiles_of_64: first", 64), (title, 512)):
        layout = sheet_layout(["c"], 1, title, tile)
        width = layout.size[0]
        assert width >= PAD + 2 * (tile + PAD)
        lines = [text for _, _, text, size, _ in layout.texts if size == TITLE_FONT]
        assert " ".join(lines) == title  # every word shown, none cut
        assert all(text_width(line, font) <= width - 2 * PAD for line in lines)
        sheet = contact_sheet([(red, "c", [red])], title, tile)
        assert sheet.size == layout.size
        assert not ink_columns(sheet, (width - PAD, 0, width, sheet.height))  # nothing reaches the edge


def test_ten_crop_views_are_labelled_on_the_sheet(tmp_path):
    from imgprep.loading.policies import policy

    labels = ["TL", "TR", "BL", "BR", "C", "TL mirrored", "TR mirrored", "BL mirrored", "BR mirrored", "C mirrored"]
    assert view_labels(policy("ten-crop")) == labels
    assert view_labels(policy("center")) == ["center crop"]
    assert view_labels(policy("caffe")) == ["epoch 0", "epoch 1", "epoch 2"]
    for tile in (64, 160):
        layout = sheet_layout(["c", "c"], 10, "t", tile, labels)
        for row in range(2):
            for column, label in enumerate(labels, start=1):
                x, y = layout.tiles[row, column]
                assert (x, y + tile + 2, label) in [(tx, ty, text) for tx, ty, text, _, _ in layout.texts]
    db = red_and_green_db(tmp_path / "db")
    out = tmp_path / "ten.png"
    run_cli("preview", db, out, "--policy", "ten-crop", "--tile", "64")
    sheet = Image.open(out).convert("RGB")
    top = grid_top(sheet, 2, 64)
    for row in range(2):
        y = top + row * (64 + CAPTION + PAD) + 64
        for column in range(1, 11):  # ink under each view, inside its column
            x = PAD + column * (64 + PAD)
            assert ink_columns(sheet, (x, y + 1, x + 64, y + 2 + CAPTION_LINE)), (row, column)


def test_under_torchrun_variables_each_row_shows_its_own_records_views(tmp_path):
    """preview reads the whole database whatever RANK and WORLD_SIZE say (a torchrun shell, a PyTorchJob
    pod): the stored record and the policy's views in a row are the same record."""
    import os

    db = red_and_green_db(tmp_path / "db")
    for rank, world in (("1", "2"), ("abc", "0")):
        out = tmp_path / f"sheet-{rank}.png"
        run_cli("preview", db, out, "--tile", "64", env={**os.environ, "RANK": rank, "WORLD_SIZE": world})
        sheet = Image.open(out).convert("RGB")
        assert sheet.width == PAD + 4 * (64 + PAD)
        for column in range(4):
            assert tile_colour(sheet, 0, column, 64, 2) == (255, 0, 0)
            assert tile_colour(sheet, 1, column, 64, 2) == (0, 255, 0)


def test_preview_of_an_incomplete_build_needs_allow_partial(sample_tree, tmp_path):
    import json

    from imgprep.prepare.build import BuildOptions, build_database
    from imgprep.formats.manifest import MANIFEST
    from imgprep.formats.imageops import ImageSpec
    from imgprep.formats.resizing import parse_resize

    db = tmp_path / "db"
    build_database(sample_tree.lists / "val.txt", sample_tree.root / "val", db,
                   BuildOptions(jobs=2, spec=ImageSpec(parse_resize("squash:64x64"), encoded=False)),
                   show_progress=False)
    manifest = json.loads((db / MANIFEST).read_text())
    (db / MANIFEST).write_text(json.dumps({**manifest, "state": "building"}))
    out = tmp_path / "sheet.png"
    assert_clean_error(run_cli("preview", db, out, "--eval", check=False), "incomplete build", "--allow-partial")
    run_cli("preview", db, out, "--eval", "--count", "2", "--allow-partial")
    assert Image.open(out).width == PAD + 2 * (160 + PAD)
    grid_top(Image.open(out), 2, 160)


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
    assert Image.open(out).width == PAD + 4 * (64 + PAD)
    grid_top(Image.open(out), 2, 64)
    assert not [name for name in os.listdir(tmp_path) if ".tmp" in name]
    assert_clean_error(run_cli("preview", db, tmp_path / "absent" / "x.png", check=False),
                       f"the folder {tmp_path / 'absent'} does not exist")
