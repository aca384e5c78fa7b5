"""`imgprep preview`: a contact sheet of a database's first records and of what a loader policy makes
of them, to check a database and an augmentation by eye before training on it: a BGR/RGB swap, a
rotated photo, a wrong label or a crop that misses the object shows at a glance.

Each row is one record (key order): the stored image (fitted into a tile, its stored size, label
and class words under it, the words cut with an ellipsis where they do not fit), then the loader's
output for it with the policy, de-normalised (the loader with normalize="none": RGB 0..255, PCA
lighting included), each view labelled: for a training policy the draws of three epochs, for
"center" its crop, for "ten-crop" its ten views (TL, TR, BL, BR, C, then the same mirrored).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from imgprep import ImgprepError
from imgprep.formats.codec import decode_datum
from imgprep.formats.files import check_output_file, write_atomic
from imgprep.formats.imageops import decode_to_rgb
from imgprep.formats.lists import SYNSET_WORDS_FILE, load_synset_words, load_synsets
from imgprep.formats.storage import Reader, detect_backend

PAD = 6
BACKGROUND, INK = (255, 255, 255), (0, 0, 0)
TITLE_FONT, TITLE_LINE = 14, 18  # the title's font size and line height, in pixels
CAPTION_FONT, CAPTION_LINE, CAPTION_LINES = 11, 13, 3  # a caption's font size, line height and most lines
CAPTION = 4 + CAPTION_LINE * CAPTION_LINES  # the band under each row of tiles
ELLIPSIS = "\u2026"
TRAINING_EPOCHS = 3


def class_names(words_file=None) -> list[str]:
    """'wnid words' per label: line i of a synset_words.txt (make-lists writes one for its labels;
    default: the shipped ILSVRC12 synsets, sorted, as make-lists labels them)."""
    path = words_file or SYNSET_WORDS_FILE
    words = load_synset_words(path)
    return [f"{wnid} {words.get(wnid, '')}".strip() for wnid in load_synsets(path)]


def stored_records(db, count: int) -> list[tuple[int, np.ndarray]]:
    """(label, upright RGB HWC uint8) of the first `count` records in key order."""
    out = []
    with Reader(db, detect_backend(db)) as reader:
        for key, value in reader.items():
            if len(out) == count:
                break
            try:
                datum = decode_datum(value)
                rgb = decode_to_rgb(datum.data) if datum.encoded else datum.pixels()[::-1].transpose(1, 2, 0)
            except Exception as e:  # noqa: BLE001 - any record that cannot be shown is named
                raise ImgprepError(f"{db}: record {bytes(key)[:60]!r} cannot be shown ({e})") from None
            out.append((datum.label, _three_channels(rgb)))
    if not out:
        raise ImgprepError(f"{db} holds no records")
    return out


def _three_channels(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        image = image[:, :, None]
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[:, :, :3]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # a Pillow without scalable default fonts
        return ImageFont.load_default()


def text_width(text: str, font) -> int:
    """The pixels `text` covers from its origin to the right edge of its ink, in `font`."""
    return font.getbbox(text)[2] if text else 0


def clipped(text: str, width: int, font, cut: bool = False) -> str:
    """`text` where it fits in `width` pixels (and not `cut`); else as much of it as fits followed by
    an ellipsis."""
    if not cut and text_width(text, font) <= width:
        return text
    if text.endswith(ELLIPSIS):
        text = text[:-1]
    while text and text_width(text.rstrip() + ELLIPSIS, font) > width:
        text = text[:-1]
    return text.rstrip() + ELLIPSIS


def fit_lines(text: str, width: int, font, most: int | None = None) -> list[str]:
    """`text` wrapped at spaces into lines of at most `width` pixels: a word too wide for a line is
    cut with an ellipsis, and where more than `most` lines would be needed the last one ends with one."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and text_width(candidate, font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    lines = [clipped(line, width, font) for line in lines + ([line] if line else [])]
    if most is not None and len(lines) > most:
        lines = lines[:most - 1] + [clipped(lines[most - 1], width, font, cut=True)]
    return lines


@dataclass
class SheetLayout:
    """Where everything on a contact sheet goes: `size` (width, height), `tiles` (row, column) ->
    top-left corner, and `texts`: (x, y, text, font size, width it must fit in)."""

    size: tuple[int, int]
    tiles: dict[tuple[int, int], tuple[int, int]]
    texts: list[tuple[int, int, str, int, int]]


def sheet_layout(captions: list[str], views: int, title: str, tile: int = 160,
                 view_labels: list[str] | None = None) -> SheetLayout:
    """The layout of a sheet of len(captions) rows, each the stored image (its caption under it, size
    first, in at most CAPTION_LINES lines) then `views` views (each labelled with its `view_labels`
    entry under it). The sheet is as wide as the grid, PAD + (1 + views) * (tile + PAD), or as the
    title's widest word; the title is wrapped to that width."""
    grid_width = PAD + (1 + views) * (tile + PAD)
    title_font, small = _font(TITLE_FONT), _font(CAPTION_FONT)
    width = max(grid_width, 2 * PAD + max((text_width(w, title_font) for w in title.split()), default=0))
    title_lines = fit_lines(title, width - 2 * PAD, title_font)
    top = 8 + TITLE_LINE * len(title_lines)
    texts = [(PAD, 4 + TITLE_LINE * n, line, TITLE_FONT, width - 2 * PAD) for n, line in enumerate(title_lines)]
    tiles = {}
    for r, caption in enumerate(captions):
        y = top + r * (tile + CAPTION + PAD)
        for c in range(1 + views):
            tiles[r, c] = (PAD + c * (tile + PAD), y)
        for n, line in enumerate(fit_lines(caption, tile, small, CAPTION_LINES)):
            texts.append((PAD, y + tile + 2 + CAPTION_LINE * n, line, CAPTION_FONT, tile))
        for c, label in enumerate((view_labels or [])[:views], start=1):
            texts.append((tiles[r, c][0], y + tile + 2, clipped(label, tile, small), CAPTION_FONT, tile))
    return SheetLayout((width, top + len(captions) * (tile + CAPTION + PAD)), tiles, texts)


def _tile(rgb: np.ndarray, tile: int) -> Image.Image:
    """The image fitted into a tile x tile square (aspect kept), centered on white."""
    image = Image.fromarray(np.ascontiguousarray(rgb))
    scale = tile / max(image.size)
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
    square = Image.new("RGB", (tile, tile), BACKGROUND)
    square.paste(image, ((tile - image.width) // 2, (tile - image.height) // 2))
    return square


def contact_sheet(rows: list[tuple[np.ndarray, str, list[np.ndarray]]], title: str, tile: int = 160,
                  view_labels: list[str] | None = None) -> Image.Image:
    """Rows of (stored RGB image, caption, the policy's RGB views), drawn as `sheet_layout` places
    them: the stored image with its caption under it, then the views, each with its label."""
    views = max(len(row_views) for _, _, row_views in rows)
    layout = sheet_layout([caption for _, caption, _ in rows], views, title, tile, view_labels)
    sheet = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    fonts = {size: _font(size) for size in (TITLE_FONT, CAPTION_FONT)}
    for x, y, text, size, _ in layout.texts:
        draw.text((x, y), text, fill=INK, font=fonts[size])
    for r, (stored, _, row_views) in enumerate(rows):
        for c, image in enumerate([stored] + list(row_views)):
            sheet.paste(_tile(image, tile), layout.tiles[r, c])
        x, y = layout.tiles[r, 0]
        draw.line([(x + tile + PAD // 2, y), (x + tile + PAD // 2, y + tile)], fill=(160, 160, 160))
    return sheet


def view_labels(chosen) -> list[str]:
    """What each view column shows: the epoch of a training policy's draw, "center crop", or ten-crop's
    views in the loader's order: TL, TR, BL, BR, C (top-left ... center), then the same mirrored."""
    from imgprep.loading.policies import TEN_CROP_POSITIONS

    if chosen.train:
        return [f"epoch {epoch}" for epoch in range(TRAINING_EPOCHS)]
    if chosen.views == 1:
        return ["center crop"]
    names = ["C" if (x, y) == (0.5, 0.5) else "TB"[int(y)] + "LR"[int(x)] for x, y in TEN_CROP_POSITIONS]
    return names + [f"{name} mirrored" for name in names]


def record_caption(rgb: np.ndarray, label: int, names: list[str]) -> str:
    """A stored record's caption: its size first (it stays whatever the words' length), then its
    label and class ('wnid words' of `names`)."""
    name = names[label] if 0 <= label < len(names) else "(no such class in the synsets)"
    return f"{rgb.shape[1]}x{rgb.shape[0]}, label {label}: {name}"


def policy_views(db, count: int, chosen, seed: int, allow_partial: bool = False) -> list[list[np.ndarray]]:
    """The loader's de-normalised output for the first `count` records (key order), per record: one
    view per epoch 0..2 for a training policy, the policy's views for an evaluation one. One shard
    (whatever torchrun's RANK and WORLD_SIZE say): the views are of the records shown beside them."""
    from imgprep.loading.loader import Loader

    with Loader(db, batch_size=count, train=chosen.train, policy=chosen, device="cpu", num_threads=1,
                normalize="none", layout="NHWC", shuffle=False, seed=seed, shard_id=0, num_shards=1,
                allow_partial=allow_partial) as loader:
        epochs = TRAINING_EPOCHS if chosen.train else 1
        batches = []
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            images, _ = next(iter(loader))
            pixels = np.clip(np.rint(np.asarray(images, np.float32)), 0, 255).astype(np.uint8)
            batches.append(_three_channels_batch(pixels))
    if chosen.views > 1:
        return [list(views) for views in batches[0]]
    return [[batch[i] for batch in batches] for i in range(len(batches[0]))]


def _three_channels_batch(images: np.ndarray) -> np.ndarray:
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def write_preview(db, out, policy=None, train: bool = True, count: int = 8, seed: int = 0, words_file=None,
                  tile: int = 160, overwrite: bool = False, allow_partial: bool = False) -> Path:
    """Writes the contact sheet of `db`'s first `count` records under `policy` (a name or
    policies.Policy; default "caffe", or "center" when not `train`) as a PNG at `out`. An incomplete
    build is refused unless `allow_partial`."""
    from imgprep.formats.database import database_info
    from imgprep.loading.policies import parse_policy, policy as make_policy

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ImgprepError(f"{out}: the contact sheet is a PNG; name it ....png")
    check_output_file(out, overwrite)  # before any work: never a link, never replaced without --overwrite
    chosen = make_policy(policy) if isinstance(policy, str) else parse_policy(policy, train)
    info = database_info(db, allow_partial)
    count = max(1, min(count, info.records))
    names = class_names(words_file)
    records = stored_records(db, count)
    views = policy_views(db, count, chosen, seed, allow_partial)
    rows = [(rgb, record_caption(rgb, label, names), record_views)
            for (label, rgb), record_views in zip(records, views)]
    what = "3 epochs' draws" if chosen.train else ("10 views" if chosen.views > 1 else "the crop")
    title = f"{Path(db).name}: first {count} records, then the {chosen.name!r} policy ({what}, seed {seed})"
    png = io.BytesIO()
    contact_sheet(rows, title, tile, view_labels(chosen)).save(png, "PNG")
    write_atomic(out, png.getvalue())
    return out
