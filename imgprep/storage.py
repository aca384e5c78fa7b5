"""LMDB and LevelDB behind one small interface: a batch writer and a key-ordered reader.

The databases hold Caffe Datum records and nothing else; imgprep's own bookkeeping lives in
sidecar files (see `manifest.py`). Caffe's LevelDB options are used: 64 KiB blocks, 256 MiB write
buffer, 100 open files, Snappy compression.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import threading
from pathlib import Path

import lmdb
import plyvel

from . import ImgprepError

BACKENDS = ("lmdb", "leveldb")
INITIAL_MAP_SIZE = 1 << 30  # an LMDB writer's first map
FIRST_RESERVATION = 256 << 20  # the most of the disk an in-place LMDB writer reserves at first
RESERVE_STEP = 4 << 30  # the most the reservation grows by at once
FLUSH_INTERVAL = 0.05  # seconds between an LMDB writer's background writebacks while it writes
IN_PLACE_VALUES = 128 << 10  # the mean value size from which an LMDB writer writes in place
LEVELDB_OPTIONS = dict(block_size=64 << 10, write_buffer_size=256 << 20, max_open_files=100,
                       compression="snappy")


def detect_backend(path: str | os.PathLike) -> str:
    path = Path(path)
    if (path / "data.mdb").is_file():
        return "lmdb"
    if (path / "CURRENT").is_file():
        return "leveldb"
    if not path.exists():
        raise ImgprepError(f"database {path} does not exist")
    raise ImgprepError(f"{path} is neither an LMDB (no data.mdb) nor a LevelDB (no CURRENT) database")


def _write_limit_hint(path) -> str | None:
    """LMDB reports a short write as EIO; find out whether a size limit or a full disk caused it."""
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    sizes = [f.stat().st_size for f in Path(path).glob("*") if f.is_file()]
    if soft != resource.RLIM_INFINITY and sizes and max(sizes) + (1 << 20) >= soft:
        return "file-size limit"
    try:
        if shutil.disk_usage(path).free < 64 << 20:
            return "full"
    except OSError:
        pass
    return None


def _storage_error(path, action: str, e: Exception) -> ImgprepError:
    text = str(e)
    cause = _write_limit_hint(path) if "Input/output error" in text or "MDB_" in text else None
    if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in text or cause == "full":
        hint = "the disk is full; free space, then run again with --resume"
    elif isinstance(e, OSError) and e.errno == errno.EFBIG or "File too large" in text or cause == "file-size limit":
        hint = "a file-size limit was hit (ulimit -f or the file system); raise it, then --resume"
    elif "Permission denied" in text or "Read-only file system" in text:
        hint = "the folder is not writable"
    elif "lock" in text.lower() and ("held" in text or "temporarily unavailable" in text):
        hint = ("another process has the database open; LevelDB allows one process at a time, so "
                "for several readers at once (one loader per GPU) build the database with --backend lmdb")
    else:
        hint = None
    return ImgprepError(f"cannot {action} {path}: {text}" + (f" ({hint})" if hint else ""))


class LmdbWriter:
    """Writes batches in one transaction each (MDB_APPEND when the keys ascend, as a build's do).

    Large records (a batch of values of IN_PLACE_VALUES or more on average: raw 256x256 ones) are
    written in place through a writable map (`writemap`), copied once, straight into the file's
    pages; LMDB's default would first copy each into malloc'd pages that are fresh for every record
    (48 page faults per 196 KB one) and then write them to the file. Smaller records (JPEG ones)
    take LMDB's default way, where those pages stay warm; through a map whose commits are synced
    they measured 3-4x dearer. The first batch of each session decides.

    In place: a writable map over a sparse file would turn a full disk into SIGBUS at the first
    store to an unallocated page, so the map never covers more of the file than has been reserved
    with `posix_fallocate`: the map and the reservation grow together (from FIRST_RESERVATION,
    doubling, then by RESERVE_STEP at a time; by exactly what a batch needs when the disk or a
    file-size limit has no room for more). A full disk or a file-size limit is an error at
    reservation time, before LMDB writes anything there. While a batch is being written, a
    background thread writes back what it has put so far (fdatasync every FLUSH_INTERVAL), so the
    commit's own sync finds less left to write and the writer waits about half as long for the
    disk. Writing data pages early never weakens LMDB's ordering: a meta page is written only after
    the data it points to is synced.

    Every commit is synced (LMDB's default), so the database on disk always holds the records of
    every transaction that committed, in key order: a power cut or kernel crash loses at most the
    transaction being committed, and `--resume` (which continues after the last key) redoes it.
    Unsynced commits (`sync=False`) were measured and not used: LMDB's pages and meta pages then
    reach the disk in any order, and after a power cut the database can be damaged, not just short.
    close() syncs once more and returns only when everything written is on disk; it then gives
    back the reservation the records did not use. A process killed mid-build (kill -9) loses
    nothing committed: the pages live in the page cache, and its unused reservation stays until the
    resumed build closes.
    """

    def __init__(self, path: str | os.PathLike, map_size: int = INITIAL_MAP_SIZE):
        self.path = Path(path)
        self.map_growths = 0
        self.in_place = None  # decided by the first batch
        self._initial_map = map_size
        self._fd = self._flusher = None
        self._writing, self._batches = False, 0
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.env = lmdb.open(str(self.path), map_size=max(map_size, self._file_size()), subdir=True,
                                 meminit=False, max_dbs=0)
            self._page = self.env.stat()["psize"]
            with self.env.begin() as txn:
                cursor = txn.cursor()
                self.last_key = cursor.key() if cursor.last() else b""
        except (lmdb.Error, OSError) as e:
            self._close_handles()
            raise _storage_error(self.path, "open LMDB", e) from None

    def _file_size(self) -> int:
        data = self.path / "data.mdb"
        return data.stat().st_size if data.exists() else 0

    def _write_in_place(self) -> None:
        """Reopens the environment with a writable map over reserved space."""
        self.env.close()
        self.env = None
        # opened at what the file holds (LMDB sizes the file to the map): the reservation comes next
        self.env = lmdb.open(str(self.path), map_size=max(self._file_size(), 1 << 16), subdir=True, writemap=True,
                             max_dbs=0)
        self._fd = os.open(self.path / "data.mdb", os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        self._reserved = 0
        first = min(self._initial_map, FIRST_RESERVATION)
        self._grow(self._used(), preferred=max(first, self.env.info()["map_size"]))
        self._stop = threading.Event()
        self._flusher = threading.Thread(target=self._flush_while_writing, name="imgprep-lmdb-flush", daemon=True)
        # started with SIGINT blocked, which it inherits: Ctrl-C stays the main thread's
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self._flusher.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def _flush_while_writing(self) -> None:
        flushed = 0
        while not self._stop.wait(FLUSH_INTERVAL):
            if self._writing or self._batches != flushed:
                flushed = self._batches
                try:
                    os.fdatasync(self._fd)
                except OSError:
                    pass  # a failing disk is reported by the commit's own sync

    def _round_up(self, size: int) -> int:
        return -(-size // self._page) * self._page

    def _used(self) -> int:
        return (self.env.info()["last_pgno"] + 1) * self._page

    def _grow(self, needed: int, preferred: int | None = None) -> None:
        """Makes the map at least `needed` bytes: `preferred` (by default the next growth step), in
        place only where the disk has room to reserve it."""
        current = self.env.info()["map_size"]
        if preferred is None:
            preferred = current + min(current, RESERVE_STEP)
        needed = self._round_up(needed)
        size = max(self._round_up(preferred), needed)
        if self._fd is not None:
            for size in dict.fromkeys((size, needed)):
                try:
                    if size > self._reserved:
                        os.posix_fallocate(self._fd, self._reserved, size - self._reserved)
                    break
                except OSError as e:
                    if size == needed or e.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                        raise
            self._reserved = size
        if size != current:
            self.env.set_mapsize(size)  # in place, LMDB sizes the file to the map: never past the reservation
            self.map_growths += size > current

    def put_batch(self, items: list[tuple[bytes, bytes]]) -> None:
        # Builds write keys in increasing order: MDB_APPEND then skips the B-tree search and
        # fills pages completely (a smaller file). Anything else is inserted normally.
        keys = [key for key, _ in items]
        append = all(a < b for a, b in zip([self.last_key] + keys, keys))
        values = sum(len(v) for _, v in items)
        # at most: every value on its own pages, a leaf page per item, the path to the last leaf
        bound = values + sum(len(k) for k in keys) + (2 * len(items) + 64) * self._page
        self._writing = True
        try:
            if self.in_place is None and items:
                self.in_place = values >= IN_PLACE_VALUES * len(items)
                if self.in_place:
                    self._write_in_place()
            if self._used() + bound > self.env.info()["map_size"]:
                self._grow(self._used() + bound)
            while True:
                try:
                    with self.env.begin(write=True) as txn:
                        with txn.cursor() as cursor:
                            cursor.putmulti(items, append=append)
                    break
                except lmdb.MapFullError:  # the bound above holds for a build; grow and retry otherwise
                    self._grow(self.env.info()["map_size"] + bound)
        except (lmdb.Error, OSError) as e:
            raise _storage_error(self.path, "write LMDB", e) from None
        finally:
            self._writing = False
            self._batches += 1
        if keys:
            self.last_key = max(self.last_key, max(keys))

    @property
    def map_size(self) -> int:
        return self.env.info()["map_size"]

    def close(self) -> None:
        """Returns once every committed record is on disk, and any unused reservation is given back."""
        if self.env is None:
            return
        self._stop_flusher()
        try:
            self.env.sync(True)
            used = self._used()
            self.env.close()
            self.env = None
            if self._fd is not None:
                os.ftruncate(self._fd, used)
        except (lmdb.Error, OSError) as e:
            raise _storage_error(self.path, "close LMDB", e) from None
        finally:
            self._close_handles()

    def _stop_flusher(self) -> None:
        if self._flusher is not None:
            self._stop.set()
            self._flusher.join()
            self._flusher = None

    def _close_handles(self) -> None:
        self._stop_flusher()
        if getattr(self, "env", None) is not None:
            self.env.close()
            self.env = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class LevelDBWriter:
    """Writes batches as one synced write batch each, with Caffe's LevelDB options.

    Each batch reaches the disk before the next is written, so after a power cut the database
    holds every batch that returned, which is what `--resume` (continuing after the last key)
    relies on. Unsynced batches were measured and not used: they saved no measurable CPU, and
    LevelDB's log recovery skips a damaged stretch and keeps what follows, so a batch lost in the
    middle would go unnoticed."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.db = plyvel.DB(str(self.path), create_if_missing=True, **LEVELDB_OPTIONS)
        except (plyvel.Error, OSError) as e:
            raise _storage_error(self.path, "open LevelDB", e) from None

    def put_batch(self, items: list[tuple[bytes, bytes]]) -> None:
        try:
            with self.db.write_batch(sync=True) as batch:
                for key, value in items:
                    batch.put(key, value)
        except (plyvel.Error, OSError) as e:
            raise _storage_error(self.path, "write LevelDB", e) from None

    def close(self) -> None:
        self.db.close()


def open_writer(path, backend: str, map_size: int = INITIAL_MAP_SIZE):
    if backend == "lmdb":
        return LmdbWriter(path, map_size)
    if backend == "leveldb":
        return LevelDBWriter(path)
    raise ImgprepError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


_SHARED: dict[tuple[str, str], list] = {}  # (backend, realpath) -> [handle, users]


def _acquire(path: Path, backend: str, open_handle):
    """One read handle per database per process, shared: LevelDB allows one open handle per
    process, and py-lmdb one environment per path."""
    key = (backend, os.path.realpath(path))
    entry = _SHARED.get(key)
    if entry is None:
        entry = _SHARED[key] = [open_handle(), 0]
    entry[1] += 1
    return entry[0]


def _release(path: Path, backend: str) -> None:
    key = (backend, os.path.realpath(path))
    entry = _SHARED[key]
    entry[1] -= 1
    if entry[1] == 0:
        entry[0].close()
        del _SHARED[key]


class Reader:
    """Key-ordered read access to an LMDB or LevelDB database."""

    def __init__(self, path: str | os.PathLike, backend: str | None = None):
        self.path = Path(path)
        self.backend = backend or detect_backend(self.path)
        try:
            if self.backend == "lmdb":
                self.env = _acquire(self.path, "lmdb", self._open_lmdb)
                self.db = None
            else:
                self.env = None
                self.db = _acquire(self.path, "leveldb",
                                   lambda: plyvel.DB(str(self.path), create_if_missing=False))
        except (lmdb.Error, plyvel.Error, OSError) as e:
            raise _storage_error(self.path, f"open {self.backend}", e) from None

    def _open_lmdb(self):
        try:
            # With the lock table a reader is safe next to a writer that is still building.
            return lmdb.open(str(self.path), readonly=True, subdir=True, max_readers=512)
        except lmdb.Error as e:
            if "Permission denied" not in str(e) and "Read-only" not in str(e):
                raise
            return lmdb.open(str(self.path), readonly=True, lock=False, subdir=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self) -> int:
        if self.env is not None:
            return self.env.stat()["entries"]
        return sum(1 for _ in self.db.iterator(include_value=False))

    def items(self, start: bytes | None = None, buffers: bool = False):
        """(key, value) pairs in key order, from `start` on. With `buffers`, LMDB yields memoryviews
        into the map (no copy), valid only until the next item is taken."""
        if self.env is not None:
            with self.env.begin(buffers=buffers) as txn:
                cursor = txn.cursor()
                found = cursor.set_range(start) if start else cursor.first()
                if found:
                    yield from cursor.iternext()
        else:
            yield from self.db.iterator(start=start)

    def keys(self):
        if self.env is not None:
            with self.env.begin() as txn:
                yield from txn.cursor().iternext(keys=True, values=False)
        else:
            yield from self.db.iterator(include_value=False)

    def get(self, key: bytes) -> bytes | None:
        if self.env is not None:
            with self.env.begin() as txn:
                return txn.get(key)
        return self.db.get(key)

    def last_key(self) -> bytes | None:
        if self.env is not None:
            with self.env.begin() as txn:
                cursor = txn.cursor()
                return cursor.key() if cursor.last() else None
        with self.db.iterator(reverse=True, include_value=False) as it:
            return next(it, None)

    def close(self) -> None:
        if self.env is not None:
            _release(self.path, "lmdb")
            self.env = None
        if self.db is not None:
            _release(self.path, "leveldb")
            self.db = None
