"""What a database holds, beneath both halves: the key format (`%08d_<path>`), record shapes, and what
the loader and the Dataset need to know of a database before reading it."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from imgprep import ImgprepError
from imgprep.formats.codec import RecordError, datum_payload, decode_datum
from imgprep.formats.resizing import parse_resize
from imgprep.formats.manifest import read_manifest, require_complete
from imgprep.formats.storage import Reader, detect_backend


def entry_key(position: int, path: str) -> bytes:
    """Caffe's key: `%08d_%s` of the entry's position in the (shuffled) list and its path."""
    return f"{position:08d}_{path}".encode("utf-8", "surrogateescape")


def key_position(key: bytes) -> int:
    """The list position an imgprep key starts with (`00000042_path` -> 42); a key without one is refused."""
    head = key.split(b"_", 1)[0]
    if not head.isdigit():
        raise ImgprepError(f"key {key[:40]!r} does not start with a position; not built by imgprep")
    return int(head)


def record_shape(value: bytes) -> tuple[int, int, int]:
    """(channels, height, width) of a record; an encoded record (which, as Caffe's, need not carry
    them) is decoded for them."""
    return datum_shape(decode_datum(value))


def datum_shape(datum) -> tuple[int, int, int]:
    """(channels, height, width) of a decoded Datum: the header's for a raw record, the JPEG's own for an
    encoded one."""
    if datum.encoded:  # imgprep stores encoded images upright, so the header's size is the image's
        from PIL import Image  # here only: compute-mean of raw records need not load Pillow

        try:
            with Image.open(io.BytesIO(datum.data)) as image:
                return len(image.getbands()), image.height, image.width
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise RecordError(f"encoded image does not open: {e}") from None
    return datum.channels, datum.height, datum.width


@dataclass(frozen=True)
class DatabaseInfo:
    """What `database_info` tells the loader about a database: backend, record count, raw or encoded, channels,
    and the records' size where one size (or one shorter side) is known."""
    path: Path
    backend: str
    records: int
    encoded: bool
    channels: int
    stored_size: tuple[int, int] | None  # (H, W) when every record has that size (raw, squash)
    shorter_side: int | None  # when every record's shorter side is known to be this (imgprep builds)


def database_info(path, allow_partial: bool = False, records: int | None = None,
                  manifest: dict | None = None) -> DatabaseInfo:
    """What the loader needs to know about a database, without walking it where it can:
    the record count comes from `records`, else from the build manifest (`imgprep-build.json`,
    state `complete`), else from LMDB's statistics, else (LevelDB) from one pass over the keys.

    Record sizes come from the manifest of an imgprep build (`identity.resize`, `identity.gray`),
    never from an encoded record's channels/height/width (Caffe may leave them out); a foreign
    encoded database is taken to hold images of differing sizes, a foreign raw one images of the
    first record's size (as convert_imageset writes them). A partial build (state other than
    `complete`) is refused unless `allow_partial`. `manifest`: the manifest `complete_manifest`
    returned for `path` (with the same `allow_partial`), where the caller read it already."""
    path = Path(path)
    backend = detect_backend(path)
    if manifest is None:
        manifest = complete_manifest(path, allow_partial)
    state = manifest.get("state")
    if records is None and state == "complete" and isinstance(manifest.get("records"), int):
        records = manifest["records"]
    with Reader(path, backend) as reader:
        key, value = next(reader.items(), (None, None))
        if records is None:
            records = len(reader)
    if key is None or records == 0:
        raise ImgprepError(f"{path} holds no records")
    try:
        data, _, encoded, (channels, height, width) = datum_payload(value)
    except RecordError as e:
        raise ImgprepError(f"{path} does not hold Caffe Datum records (key {key[:40]!r}: {e})") from None
    identity = manifest.get("identity", {})
    stored, shorter = None, None
    if identity:
        channels = 1 if identity.get("gray") else 3
        policy = parse_resize(identity.get("resize", "none"))
        if policy.kind == "squash":
            stored = (policy.height, policy.width)
        elif identity.get("check_size") and not encoded:
            stored = (height, width)
        if policy.kind == "shorter":
            shorter = policy.width or policy.height
    elif encoded:
        channels = 3  # decoded as RGB, whatever the JPEG holds
    else:
        stored = (height, width)
    if stored is not None:
        shorter = min(stored)
    return DatabaseInfo(path, backend, records, encoded, channels, stored, shorter)


def complete_manifest(path: Path, allow_partial: bool) -> dict:
    """The build manifest ({} for a database imgprep did not build); a partial build is an error
    unless `allow_partial`."""
    manifest = read_manifest(path)
    require_complete(path, manifest, allow_partial)
    return manifest or {}
