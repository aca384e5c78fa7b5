"""Records of an LMDB or LevelDB database by index (key order), for the loader's pipelines.

The database's keys are read once, when the source opens (one pass over the keys: for LMDB the
B-tree's leaf pages only, about 1 s per million records; for LevelDB, whose keys live in blocks
beside their values, one sequential read of the whole database). After that every record is one
lookup by key. Values come back as views into LMDB's memory map (no copy) until DALI copies them.
"""

from __future__ import annotations

import numpy as np

from imgprep import ImgprepError
from imgprep.formats.codec import RecordError, datum_payload
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

    def read(self, indices: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """The records at `indices`: data arrays (views into LMDB's map, or into LevelDB's value
        bytes) and int32 labels."""
        keys = self._keys.take(indices)
        get = self._txn.get if self._txn is not None else self._reader.db.get
        data, labels = [], []
        for key in keys:
            value = get(key)
            try:
                payload, label, encoded, (c, h, w) = datum_payload(value)
            except (RecordError, TypeError) as e:  # TypeError: the key went away (None)
                raise self._bad(key, value, e) from None
            array = np.frombuffer(payload, np.uint8)
            data.append(array if encoded else array.reshape(h, w, c))  # readers.caffe's (H, W, C) labelling
            labels.append(label)
        return data, np.array(labels, np.int32)

    def sizes(self, indices: np.ndarray, data: list[np.ndarray]) -> np.ndarray:
        """(height, width) of the records at `indices`, whose data `read` returned: a raw record's
        shape, an encoded one's image header (read without decoding the image)."""
        from io import BytesIO

        from PIL import Image

        out = np.zeros((len(data), 2), np.int64)
        for i, (index, array) in enumerate(zip(indices.tolist(), data)):
            if array.ndim == 3:
                out[i] = array.shape[:2]
                continue
            try:
                with Image.open(BytesIO(array.tobytes())) as image:
                    out[i] = image.size[::-1]
            except Exception as e:  # noqa: BLE001 - whatever Pillow says, the record is named
                raise ImgprepError(f"{self.path}: record {self.key(index)!r} is not a decodable image "
                                   f"(no image size in its header: {e})") from None
        return out

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
        if self._reader is not None:
            if self._txn is not None:
                self._txn.abort()
                self._txn = None
            self._reader.close()
            self._reader = None
