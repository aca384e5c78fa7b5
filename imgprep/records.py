"""Records of an LMDB or LevelDB database by index (key order), for the loader's pipelines.

The database's keys are read once, when the source opens (one pass over the keys: for LMDB the
B-tree's leaf pages only, about 1 s per million records; for LevelDB, whose keys live in blocks
beside their values, one sequential read of the whole database). After that every record is one
lookup by key. Values come back as views into LMDB's memory map (no copy) until DALI copies them.

The loader's feed calls `read` (and, for RandomResizedCrop, `sizes`) once per batch on one Python
thread, so both are kept to a few microseconds per record: Datums laid out as Caffe writes them are
parsed by hand (anything else goes through `codec.datum_payload`, which validates), and a JPEG's
size comes from its frame header (`jpeg_size`) rather than from opening it with Pillow.
"""

from __future__ import annotations

import struct

import numpy as np

from . import ImgprepError
from .codec import RecordError, _int32, datum_payload
from .storage import Reader


class KeyIndex:
    """A database's keys in key order, as one bytes object and offsets: about 50 bytes per record
    rather than ~90 for a list of bytes objects, and a forked DataLoader worker shares its pages where
    a list of a million objects would be copied by refcount writes."""

    def __init__(self, keys):
        keys = list(keys)
        self.blob = b"".join(keys)
        self.offsets = np.cumsum([0] + [len(k) for k in keys], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> bytes:
        return self.blob[self.offsets[index]:self.offsets[index + 1]]

    def take(self, indices: np.ndarray) -> list[bytes]:
        """The keys at `indices`."""
        blob = self.blob
        return [blob[a:b] for a, b in zip(self.offsets[indices].tolist(), self.offsets[indices + 1].tolist())]


class RecordSource:
    """`read(indices)` -> the records' data (as DALI's `readers.caffe` shapes them: encoded bytes,
    or raw planar bytes labelled (H, W, C)) and labels. LMDB: one read transaction, held open while
    the source is; LevelDB: the process's one handle (LevelDB allows one process at a time)."""

    def __init__(self, path, backend: str):
        self.path, self.backend = path, backend
        self._reader = Reader(path, backend)
        try:
            self._keys = KeyIndex(self._reader.keys())
            self._txn = self._reader.env.begin(buffers=True) if self._reader.env is not None else None
        except BaseException:
            self._reader.close()
            raise

    def __len__(self) -> int:
        return len(self._keys)

    def key(self, index: int) -> bytes:
        return self._keys[index]

    def value(self, index: int):
        key = self.key(index)
        value = self._txn.get(key) if self._txn is not None else self._reader.db.get(key)
        if value is None:
            raise self._bad(key, None, None)
        return value

    def read(self, indices: np.ndarray) -> tuple[list[memoryview], np.ndarray]:
        """The records at `indices`: their data as memoryviews (into LMDB's map, or into LevelDB's
        value bytes; encoded: the image file's bytes, raw: shaped (H, W, C) as `readers.caffe` labels
        Caffe's planar bytes) and int32 labels."""
        keys = self._keys.take(indices)
        get = self._txn.get if self._txn is not None else self._reader.db.get
        data, labels = [], []
        for key in keys:
            value = get(key)
            parsed = _canonical(value) if value is not None else None
            if parsed is None:  # another layout, or malformed: the full decoder says which
                try:
                    payload, label, encoded, (c, h, w) = datum_payload(value)
                except (RecordError, TypeError) as e:  # TypeError: the key went away (None)
                    raise self._bad(key, value, e) from None
                parsed = (payload if encoded else payload.cast("B", (h, w, c)), label)
            data.append(parsed[0])
            labels.append(parsed[1])
        return data, np.array(labels, np.int32)

    def sizes(self, indices: np.ndarray, data: list) -> np.ndarray:
        """(height, width) of the records at `indices`, whose data `read` returned, as DALI's
        decoders produce them: a raw record's shape; an encoded one's image size from its header
        (`jpeg_size`: EXIF orientation applied, as DALI applies it), with Pillow reading the header
        of any other format."""
        out = np.zeros((len(data), 2), np.int64)
        for i, array in enumerate(data):
            if array.ndim == 3:
                out[i] = array.shape[:2]
            else:
                out[i] = jpeg_size(array) or self._image_size(int(indices[i]), array)
        return out

    def _image_size(self, index: int, data) -> tuple[int, int]:
        """(height, width) of a record that `jpeg_size` cannot read, upright, by Pillow."""
        from io import BytesIO

        from PIL import Image

        from .imageops import orientation

        try:
            with Image.open(BytesIO(bytes(data))) as image:
                width, height = image.size
                turned = orientation(image) in (5, 6, 7, 8)
        except Exception as e:  # noqa: BLE001 - whatever Pillow says, the record is named
            raise ImgprepError(f"{self.path}: record {self.key(index)!r} is not a decodable image "
                               f"(no image size in its header: {e})") from None
        return (width, height) if turned else (height, width)

    def _bad(self, key: bytes, value, error: Exception) -> ImgprepError:
        if value is None:
            return ImgprepError(f"{self.path}: record {key!r} went away while the loader was reading "
                                "(the database was rewritten)")
        return ImgprepError(f"{self.path}: record {key!r} is not a Caffe image Datum ({error})")

    def culprit(self, indices) -> str | None:
        """Why the first record of `indices` that cannot be decoded fails (with its key), or None."""
        from .imageops import ImageFailure, decode_upright

        for index in indices.tolist():
            data, _, encoded, _ = datum_payload(self.value(index))
            if not encoded:
                continue
            try:
                decode_upright(bytes(data))
            except ImageFailure as e:
                return f"record {self.key(index)!r} is not a decodable image ({e.reason}: {e.detail})"
            except Exception as e:  # noqa: BLE001 - any decoder failure names the record
                return f"record {self.key(index)!r} is not a decodable image ({e})"
        return None

    def close(self) -> None:
        if self._reader is not None:
            if self._txn is not None:
                self._txn.abort()
                self._txn = None
            self._reader.close()
            self._reader = None


def _canonical(value):
    """(data, label) of a Datum laid out as Caffe's serializer writes it (fields 1-3 optional and
    in order, then data, label, encoded last), as `codec.datum_payload` returns them (raw data
    shaped (H, W, C)); None for any other layout or anything malformed, for datum_payload to judge."""
    view = memoryview(value)
    try:
        pos, c, h, w = 0, 0, 0, 0
        tag = view[0]
        for number in (0x08, 0x10, 0x18):  # channels, height, width: each optional, in this order
            if tag != number:
                continue
            b = view[pos + 1]
            pos += 2
            v, shift = b & 0x7F, 7
            while b & 0x80:
                b = view[pos]
                pos += 1
                v |= (b & 0x7F) << shift
                shift += 7
            if shift > 70:
                return None
            if number == 0x08:
                c = v
            elif number == 0x10:
                h = v
            else:
                w = v
            tag = view[pos]
        if tag != 0x22:
            return None
        b = view[pos + 1]
        pos += 2
        size, shift = b & 0x7F, 7
        while b & 0x80:
            b = view[pos]
            pos += 1
            size |= (b & 0x7F) << shift
            shift += 7
        end = pos + size
        label, q = 0, end
        if view[q] == 0x28:
            b = view[q + 1]
            q += 2
            label, shift = b & 0x7F, 7
            while b & 0x80:
                b = view[q]
                q += 1
                label |= (b & 0x7F) << shift
                shift += 7
            if shift > 70:
                return None
        if q + 2 != len(view) or view[q] != 0x38 or view[q + 1] > 1:
            return None
    except IndexError:
        return None
    data = view[pos:end]
    if view[q + 1]:
        return data, _int32(label)
    if not c * h * w or c * h * w != size:
        return None
    return data.cast("B", (_int32(h), _int32(w), _int32(c))), _int32(label)


_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
_NO_LENGTH = frozenset((0x01, *range(0xD0, 0xD8)))  # TEM, RST0-7: markers without a length
_TURNED = frozenset((5, 6, 7, 8))  # EXIF orientations that swap width and height


def jpeg_size(data) -> tuple[int, int] | None:
    """(height, width) of a JPEG as decoded upright, from its markers alone: the first frame
    header (SOF0-15: baseline, extended, progressive, lossless, arithmetic), width and height
    swapped where the first APP1 Exif block's orientation turns the image (5-8), as DALI's
    decoders do (adjust_orientation). APPn, comments, tables and fill bytes are skipped by their
    lengths, so an EXIF thumbnail's own frame header is never taken. None where `data` is not a
    JPEG or no frame header comes before the first scan (the caller then asks Pillow)."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    pos, turned, exif = 2, False, False
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # a fill byte
            pos += 1
            continue
        if marker in _NO_LENGTH:
            pos += 2
            continue
        length = data[pos + 2] << 8 | data[pos + 3]
        if marker in _SOF:
            if pos + 9 > n or length < 8:
                return None
            height, width = data[pos + 5] << 8 | data[pos + 6], data[pos + 7] << 8 | data[pos + 8]
            if not height or not width:  # height 0: defined later by a DNL marker
                return None
            return (width, height) if turned else (height, width)
        if marker in (0xD8, 0xD9, 0xDA) or length < 2:  # SOI, EOI, a scan before any frame header
            return None
        if marker == 0xE1 and not exif and data[pos + 4:pos + 10] == b"Exif\0\0":
            exif = True
            turned = _exif_orientation(data, pos + 10, min(n, pos + 2 + length)) in _TURNED
        pos += 2 + length
    return None


def _exif_orientation(data, start: int, end: int) -> int:
    """The orientation tag (0x0112) of the TIFF block at data[start:end] (IFD0), 1 where it is
    absent or unreadable (as Pillow and DALI take a broken EXIF block)."""
    try:
        order = {b"II": "<", b"MM": ">"}.get(bytes(data[start:start + 2]))
        if order is None:
            return 1
        ifd = start + struct.unpack_from(order + "I", data, start + 4)[0]
        if ifd + 2 > end:
            return 1
        for entry in range(ifd + 2, min(end - 11, ifd + 2 + 12 * struct.unpack_from(order + "H", data, ifd)[0]), 12):
            tag, kind = struct.unpack_from(order + "HH", data, entry)
            if tag == 0x0112:
                return struct.unpack_from(order + "H", data, entry + 8)[0] if kind == 3 else 1
    except struct.error:
        pass
    return 1
