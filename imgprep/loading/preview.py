"""`imgprep preview`: a contact sheet of a database's first records and of what a loader policy makes
of them, to check a database and an augmentation by eye before training on it: a BGR/RGB swap, a
rotated photo, a wrong label or a crop that misses the object shows at a glance.

Each row is one record (key order): the stored image (fitted into a tile, its label, class words and
stored size under it), then the loader's output for it with the policy, de-normalised (the loader
with normalize="none": RGB 0..255, PCA lighting included): for a training policy the draws of three
epochs, for "center" its crop, for "ten-crop" its ten views.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from imgprep import ImgprepError
from imgprep.formats.codec import decode_datum
from imgprep.formats.files import check_output_file, write_atomic
from imgprep.formats.imageops import decode_to_rgb
from imgprep.formats.lists import SYNSET_WORDS_FILE, load_synset_words, load_synsets
from imgprep.formats.storage import Reader, detect_backend

PAD, CAPTION, TITLE = 6, 30, 24
BACKGROUND = (255, 255, 255)
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


def _tile(rgb: np.ndarray, tile: int) -> Image.Image:
    """The image fitted into a tile x tile square (aspect kept), centered on white."""
    image = Image.fromarray(np.ascontiguousarray(rgb))
    scale = tile / max(image.size)
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
    square = Image.new("RGB", (tile, tile), BACKGROUND)
    square.paste(image, ((tile - image.width) // 2, (tile - image.height) // 2))
    return square


def contact_sheet(rows: list[tuple[np.ndarray, str, list[np.ndarray]]], title: str, tile: int = 160) -> Image.Image:
    """Rows of (stored RGB image, caption, the policy's RGB views), drawn as tiles: the stored image
    with its caption under it, then the views. Size: width PAD + (1 + most views) * (tile + PAD),
    height TITLE + rows * (tile + CAPTION + PAD)."""
    columns = 1 + max(len(views) for _, _, views in rows)
    sheet = Image.new("RGB", (PAD + columns * (tile + PAD), TITLE + len(rows) * (tile + CAPTION + PAD)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((PAD, 4), title, fill=(0, 0, 0), font=_font(14))
    small = _font(11)
    for r, (stored, caption, views) in enumerate(rows):
        top = TITLE + r * (tile + CAPTION + PAD)
        sheet.paste(_tile(stored, tile), (PAD, top))
        for line, text in enumerate(_wrap(caption, tile, small, draw)[:2]):
            draw.text((PAD, top + tile + 2 + 13 * line), text, fill=(0, 0, 0), font=small)
        for c, view in enumerate(views, start=1):
            sheet.paste(_tile(view, tile), (PAD + c * (tile + PAD), top))
        draw.line([(PAD + tile + PAD // 2, top), (PAD + tile + PAD // 2, top + tile)], fill=(160, 160, 160))
    return sheet


def _wrap(text: str, width: int, font, draw) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + [line] if line else lines


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
    rows = []
    for (label, rgb), record_views in zip(records, views):
        name = names[label] if 0 <= label < len(names) else "(no such class in the synsets)"
        rows.append((rgb, f"{label}: {name} [{rgb.shape[1]}x{rgb.shape[0]}]", record_views))
    what = "3 epochs' draws" if chosen.train else ("10 views" if chosen.views > 1 else "the crop")
    title = f"{Path(db).name}: first {count} records, then the {chosen.name!r} policy ({what}, seed {seed})"
    png = io.BytesIO()
    contact_sheet(rows, title, tile).save(png, "PNG")
    write_atomic(out, png.getvalue())
    return out
