"""Records of an LMDB or LevelDB database by index (key order), for the loader's pipelines.

The database's keys are read once, when the source opens (one pass over the keys: for LMDB the
B-tree's leaf pages only, about 1 s per million records; for LevelDB, whose keys live in blocks
beside their values, one sequential read of the whole database). After that every record is one
lookup by key. Values come back as views into LMDB's memory map (no copy) until DALI copies them.

The loader's feed calls `read` (and, for RandomResizedCrop, `sizes`) once per batch on one Python
thread, so both are kept to a few microseconds per record: Datums laid out as Caffe writes them are
parsed by hand (anything else goes through `codec.datum_payload`, which validates), a JPEG's size
comes from its frame header (`jpeg_size`) rather than from opening it with Pillow, and what a record's
first read learnt (where its data lies in the value, its label, its size: 24 bytes per record) is
kept, so later epochs only look the record up. The values cannot change while the source is open:
LMDB's read transaction sees one snapshot, and LevelDB's one handle keeps every other process out.
"""

from __future__ import annotations

import struct

import numpy as np

from imgprep import ImgprepError
from imgprep.formats.codec import RecordError, _int32, datum_payload
from imgprep.formats.storage import Reader


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
            self._txn = self._reader.snapshot() if self._reader.env is not None else None
            # per record: data start and end in the value (start -1: not parsed yet), height, width,
            # channels (0: encoded; its height and width 0 until `sizes` reads them), and the label
            self._layout = np.zeros((len(self._keys), 5), np.int32)
            self._layout[:, 0] = -1
            self._labels = np.zeros(len(self._keys), np.int32)
        except BaseException:
            self._reader.close()
            raise

    def __len__(self) -> int:
        return len(self._keys)

    def key(self, index: int) -> bytes:
        """The key of record `index` (key order)."""
        return self._keys[index]

    def value(self, index: int):
        """The stored value of record `index` (an ImgprepError where it went away)."""
        key = self.key(index)
        value = self._txn.get(key) if self._txn is not None else self._reader.db.get(key)
        if value is None:
            raise self._bad(key, None, None)
        return value

    def read(self, indices: np.ndarray) -> tuple[list[memoryview], np.ndarray]:
        """The records at `indices`: their data as memoryviews (into LMDB's map, or into LevelDB's
        value bytes; encoded: the image file's bytes, raw: shaped (H, W, C) as `readers.caffe` labels
        Caffe's planar bytes) and int32 labels (a new array)."""
        indices = np.asarray(indices)
        keys = self._keys.take(indices)
        get = self._txn.get if self._txn is not None else self._reader.db.get
        data, first = [], []  # first: (index, label, start, end, h, w, c) of records read for the first time
        for index, key, (start, end, h, w, c) in zip(indices.tolist(), keys, self._layout[indices].tolist()):
            value = get(key)
            if value is None:
                raise self._bad(key, None, None)
            view = value if type(value) is memoryview else memoryview(value)
            if start < 0:
                data.append(self._parse(index, key, view, first))
            elif c:
                data.append(view[start:end].cast("B", (h, w, c)))
            else:
                data.append(view[start:end])
        if first:  # kept in one step per batch: numpy's per-element writes cost more than the parse
            rows = np.array(first, np.int64)
            self._labels[rows[:, 0]] = rows[:, 1]
            known, raw = rows[:, 2] >= 0, rows[:, 6] > 0
            self._layout[rows[known & ~raw, 0], :2] = rows[known & ~raw, 2:4]  # encoded: the size comes later
            self._layout[rows[known & raw, 0]] = rows[known & raw, 2:]
        return data, self._labels[indices]

    def _parse(self, index: int, key: bytes, view: memoryview, first: list):
        """A record's first read: its data; its label and layout appended to `first` (start -1 where
        it is not in Caffe's layout, so datum_payload parses it every time)."""
        parsed = _canonical(view)
        if parsed is None:  # another layout, or malformed: the full decoder says which
            try:
                payload, label, encoded, (c, h, w) = datum_payload(view)
            except RecordError as e:
                raise self._bad(key, view, e) from None
            first.append((index, label, -1, -1, 0, 0, 0))
            return payload if encoded else payload.cast("B", (h, w, c))
        start, end, label, shape = parsed
        first.append((index, label, start, end, *(shape or (0, 0, 0))))
        return view[start:end] if shape is None else view[start:end].cast("B", shape)

    def sizes(self, indices: np.ndarray, data: list) -> np.ndarray:
        """(height, width) of the records at `indices`, whose data `read` returned, as DALI's
        decoders produce them: a raw record's shape; an encoded one's image size from its header
        (`jpeg_size`: EXIF orientation applied, as DALI applies it), with Pillow reading the header
        of any other format; each read once."""
        indices = np.asarray(indices)
        out = self._layout[indices, 2:4].astype(np.int64)
        missing = np.flatnonzero(out[:, 0] == 0)
        if len(missing):
            found = []
            for i in missing.tolist():
                array = data[i]
                found.append(array.shape[:2] if array.ndim == 3 else
                             jpeg_size(array) or self._image_size(int(indices[i]), array))
            out[missing] = found
            self._layout[indices[missing], 2:4] = found
        return out

    def _image_size(self, index: int, data) -> tuple[int, int]:
        """(height, width) of a record that `jpeg_size` cannot read, upright, by Pillow."""
        from io import BytesIO

        from PIL import Image

        from imgprep.formats.imageops import orientation

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
        from imgprep.formats.imageops import ImageFailure, decode_upright

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
        """Ends the read transaction and releases the database handle."""
        if self._reader is not None:
            if self._txn is not None:
                self._txn.abort()
                self._txn = None
            self._reader.close()
            self._reader = None


def _canonical(value):
    """(start, end, label, shape) of a Datum laid out as Caffe's serializer writes it (fields 1-3
    optional and in order, then data, label, encoded last): its data is value[start:end], the label
    and (H, W, C) of a raw record (None: encoded) as `codec.datum_payload` reads them; None for any
    other layout or anything malformed, for datum_payload to judge."""
    view = value if type(value) is memoryview else memoryview(value)
    try:
        pos, c, h, w = 0, 0, 0, 0
        tag = view[0]
        for number in () if tag == 0x22 else (0x08, 0x10, 0x18):  # channels, height, width: optional, in order
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
    if view[q + 1]:
        return pos, end, _int32(label), None
    if not c * h * w or c * h * w != size:
        return None
    return pos, end, _int32(label), (_int32(h), _int32(w), _int32(c))


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
