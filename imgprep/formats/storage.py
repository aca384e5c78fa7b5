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
from contextlib import contextmanager
from pathlib import Path

import lmdb
import plyvel

from imgprep import ImgprepError

BACKENDS = ("lmdb", "leveldb")
INITIAL_MAP_SIZE = 1 << 30  # an LMDB writer's first map
FIRST_RESERVATION = 256 << 20  # the most of the disk an in-place LMDB writer reserves at first
RESERVE_STEP = 4 << 30  # the most the reservation grows by at once
FLUSH_INTERVAL = 0.05  # seconds between an LMDB writer's background writebacks while it writes
IN_PLACE_VALUES = 128 << 10  # the mean value size from which an LMDB writer writes in place
LEVELDB_OPTIONS = dict(block_size=64 << 10, write_buffer_size=256 << 20, max_open_files=100,
                       compression="snappy")


def detect_backend(path: str | os.PathLike) -> str:
    """'lmdb' or 'leveldb', from the database's files at `path` (data.mdb, or CURRENT); a folder holding neither
    is refused."""
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


RESUME_HINT = "run again with --resume"  # how build-lmdb continues; merge and prepare pass their own


def _storage_error(path, action: str, e: Exception, resume_hint: str = RESUME_HINT) -> ImgprepError:
    """`e` as one message naming `path`, with what to do about a full disk, a size limit, a read-only
    folder or a second process; `resume_hint` says how to continue once the disk has room."""
    text = str(e)
    cause = _write_limit_hint(path) if "Input/output error" in text or "MDB_" in text else None
    if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in text or cause == "full":
        hint = f"the disk is full; free space, then {resume_hint}"
    elif isinstance(e, OSError) and e.errno == errno.EFBIG or "File too large" in text or cause == "file-size limit":
        hint = f"a file-size limit was hit (ulimit -f or the file system); raise it, then {resume_hint}"
    elif "Permission denied" in text or "Read-only file system" in text:
        hint = "the folder is not writable"
    elif "lock" in text.lower() and ("held" in text or "temporarily unavailable" in text):
        hint = ("another process has the database open; LevelDB allows one process at a time, so "
                "for several readers at once (one loader per GPU) build the database with --backend lmdb")
    else:
        hint = None
    return ImgprepError(f"cannot {action} {path}: {text}" + (f" ({hint})" if hint else ""))


class LmdbWriter:
    """Writes records in synced transactions: `add` puts records into the open transaction, `commit`
    ends it, `put_batch` is both (MDB_APPEND when the keys ascend, as a build's do). A value may be
    any buffer (a build's raw records are put straight from the shared memory its workers wrote
    them to); `before_commit()`, when given, runs before every commit (a build makes its failure
    log durable there first).

    Large records (a batch of values of IN_PLACE_VALUES or more on average: raw 256x256 ones) are
    written in place through a writable map (`writemap`), copied once, straight into the file's
    pages; LMDB's default would first copy each into malloc'd pages that are fresh for every record
    (48 page faults per 196 KB one) and then write them to the file. Smaller records (JPEG ones)
    take LMDB's default way, where those pages stay warm; through a map whose commits are synced
    they measured 3-4x dearer. The first batch a writer is given decides.

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

    def __init__(self, path: str | os.PathLike, map_size: int = INITIAL_MAP_SIZE, before_commit=None,
                 resume_hint: str = RESUME_HINT):
        self.path = Path(path)
        self.before_commit, self.resume_hint = before_commit, resume_hint
        self._txn = None
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
            raise _storage_error(self.path, "open LMDB", e, self.resume_hint) from None

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
        """Writes `items` ((key, value) pairs) in one transaction (with whatever `add` put before it)."""
        self.add(items)
        self.commit()

    def add(self, items) -> None:
        """Puts `items` ((key, value) pairs; a value may be any buffer, read only during the call) into
        the open transaction, beginning one. Where the map cannot hold them beside what the transaction
        already holds, that transaction is committed first (`commit`) and the map grown."""
        if not items:
            return
        # Builds write keys in increasing order: MDB_APPEND then skips the B-tree search and
        # fills pages completely (a smaller file). Anything else is inserted normally.
        keys = [key for key, _ in items]
        append = all(a < b for a, b in zip([self.last_key] + keys, keys))
        values = sum(len(v) for _, v in items)
        # at most: every value on its own pages, a leaf page per item, the path to the last leaf
        bound = values + sum(len(k) for k in keys) + (2 * len(items) + 64) * self._page
        try:
            if self.in_place is None:
                self.in_place = values >= IN_PLACE_VALUES * len(items)
                if self.in_place:
                    self._write_in_place()
            if self._txn is not None and self._txn_end + bound > self.env.info()["map_size"]:
                self.commit()
            while True:
                fresh = self._txn is None
                if fresh:
                    used = self._used()
                    if used + bound > self.env.info()["map_size"]:
                        self._grow(used + bound)
                    self._txn, self._txn_end, self._writing = self.env.begin(write=True), used, True
                try:
                    with self._txn.cursor() as cursor:
                        cursor.putmulti(items, append=append)
                    break
                except lmdb.MapFullError:  # the bound holds for a build; otherwise grow and retry
                    self._abort()
                    if not fresh:  # what the transaction held before cannot be put again from here
                        raise
                    self._grow(self.env.info()["map_size"] + bound)
        except (lmdb.Error, OSError) as e:
            self._abort()
            raise _storage_error(self.path, "write LMDB", e, self.resume_hint) from None
        self._txn_end += bound
        self.last_key = max(self.last_key, max(keys))

    def commit(self) -> None:
        """Commits the open transaction, if any (synced: see the class's notes), after `before_commit`."""
        if self._txn is None:
            return
        if self.before_commit is not None:
            try:
                self.before_commit()
            except BaseException:
                self._abort()  # its records are not kept: --resume redoes them
                raise
        try:
            self._txn.commit()
        except (lmdb.Error, OSError) as e:
            raise _storage_error(self.path, "write LMDB", e, self.resume_hint) from None
        finally:
            self._txn, self._writing = None, False
            self._batches += 1

    def _abort(self) -> None:
        if self._txn is not None:
            self._txn.abort()
            self._txn, self._writing = None, False

    @property
    def map_size(self) -> int:
        """The LMDB map's current size in bytes (it doubles whenever a write fills it)."""
        return self.env.info()["map_size"]

    def close(self) -> None:
        """Returns once every committed record is on disk, and any unused reservation is given back."""
        if self.env is None:
            return
        self._abort()  # what was added and not committed is not kept: --resume redoes it
        self._stop_flusher()
        try:
            self.env.sync(True)
            used = self._used()
            self.env.close()
            self.env = None
            if self._fd is not None:
                os.ftruncate(self._fd, used)
        except (lmdb.Error, OSError) as e:
            raise _storage_error(self.path, "close LMDB", e, self.resume_hint) from None
        finally:
            self._close_handles()

    def _stop_flusher(self) -> None:
        if self._flusher is not None:
            self._stop.set()
            self._flusher.join()
            self._flusher = None

    def _close_handles(self) -> None:
        self._stop_flusher()
        self._abort()
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

    def __init__(self, path: str | os.PathLike, before_commit=None, resume_hint: str = RESUME_HINT):
        self.path = Path(path)
        self.before_commit, self.resume_hint = before_commit, resume_hint
        self._batch = None
        try:
            self.db = plyvel.DB(str(self.path), create_if_missing=True, **LEVELDB_OPTIONS)
        except (plyvel.Error, OSError) as e:
            raise _storage_error(self.path, "open LevelDB", e, self.resume_hint) from None

    def put_batch(self, items: list[tuple[bytes, bytes]]) -> None:
        """Writes `items` ((key, value) pairs) in one synced write batch (with whatever `add` put before it)."""
        self.add(items)
        self.commit()

    def add(self, items) -> None:
        """Adds `items` ((key, value) pairs; a value may be any buffer, read only during the call) to
        the open write batch, beginning one."""
        if self._batch is None:
            self._batch = self.db.write_batch(sync=True)
        for key, value in items:
            self._batch.put(key, value if isinstance(value, bytes) else bytes(value))

    def commit(self) -> None:
        """Writes the open batch, if any, after `before_commit`."""
        if self._batch is None:
            return
        batch, self._batch = self._batch, None
        if self.before_commit is not None:
            self.before_commit()  # raising, the batch is dropped: --resume redoes it
        try:
            batch.write()
        except (plyvel.Error, OSError) as e:
            raise _storage_error(self.path, "write LevelDB", e, self.resume_hint) from None

    def close(self) -> None:
        """Closes the database (a batch added and not committed is dropped); the writer is unusable afterwards."""
        if self._batch is not None:
            self._batch.clear()
            self._batch = None
        self.db.close()


def open_writer(path, backend: str, map_size: int = INITIAL_MAP_SIZE, before_commit=None,
                resume_hint: str = RESUME_HINT):
    """A batch writer for a new or existing database at `path`: `put_batch([(key, value), ...])` writes
    one transaction; `add(items)` puts items into the open one and `commit()` ends it, calling
    `before_commit()` first; `close()` ends the writer. `backend` is "lmdb" or "leveldb" (Caffe's
    LevelDB options). A full disk or a size limit is an error that ends with `resume_hint`, how the
    caller continues once there is room."""
    if backend == "lmdb":
        return LmdbWriter(path, map_size, before_commit, resume_hint)
    if backend == "leveldb":
        return LevelDBWriter(path, before_commit, resume_hint)
    raise ImgprepError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


class _Shared:
    """One process's read handle on one database file, shared by that process's Readers; `transactions`
    counts the read transactions open on it (a child forked meanwhile inherits them)."""

    def __init__(self, handle, pid: int):
        self.handle, self.pid, self.users, self.transactions = handle, pid, 0, 0


_SHARED: dict[tuple, _Shared] = {}  # (backend, realpath, file identity, pid) -> handle
_IDENTITY_FILE = {"lmdb": "data.mdb", "leveldb": "LOCK"}


def _identity(real: str, backend: str) -> tuple[int, int] | None:
    """(device, inode) of the database's data.mdb (LMDB) or LOCK (LevelDB). `build-lmdb --overwrite`
    deletes a database's files and writes new ones, so a rebuilt database is another inode, and that
    inode cannot be reused while a handle holds the old file open. Size and modification time are left
    out: they change with every commit of a build still being written, which readers may follow, and a
    second LMDB environment on the same file in one process is what LMDB forbids."""
    try:
        st = os.stat(os.path.join(real, _IDENTITY_FILE[backend]))
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _acquire(path: Path, backend: str, open_handle) -> _Shared:
    """This process's read handle on the database now at `path`, shared by its Readers (LevelDB allows
    one handle per process, py-lmdb one environment per file). A handle belongs to one database file
    (a database rebuilt since gets a new handle) and to the process that opened it (a forked child
    opens its own: LMDB forbids using an environment across fork)."""
    real, pid = os.path.realpath(path), os.getpid()
    identity = _identity(real, backend)
    shared = _SHARED.get((backend, real, identity, pid))
    if shared is None:
        _leave_inherited(path, backend, real, identity, pid)
        if backend == "leveldb" and any(k[:2] == (backend, real) and k[3] == pid for k in _SHARED):
            raise ImgprepError(f"{path} was rebuilt while this process still holds the old database open (a "
                               "Loader or CaffeDataset made before the rebuild); LevelDB allows one handle per "
                               "process: close() those first")
        shared = _Shared(open_handle(), pid)
        _SHARED[(backend, real, _identity(real, backend), pid)] = shared  # LevelDB makes a missing LOCK
    shared.users += 1
    return shared


def _leave_inherited(path: Path, backend: str, real: str, identity, pid: int) -> None:
    """Lets this forked process open its own handle where it inherited its parent's on the same file:
    an LMDB environment with no read transaction open is closed here (that touches only this
    process's mappings, not the parent's readers); one with a transaction open, or a LevelDB, the
    parent still holds, and a clear error says so."""
    for key in [k for k in _SHARED if k[:3] == (backend, real, identity) and k[3] != pid]:
        shared = _SHARED[key]
        if backend == "leveldb":
            raise ImgprepError(f"{path}: this process was forked from one that holds the LevelDB open, and LevelDB "
                               "allows one process at a time: close() it there first (a CaffeDataset read in the "
                               "main process before a DataLoader starts its worker), or build an LMDB")
        if shared.transactions:
            raise ImgprepError(f"{path}: this process was forked while its parent was reading the LMDB (an open "
                               "Loader); LMDB forbids using its handle across fork, and closing it here would end "
                               "the parent's read: open the database after the fork, or start processes with "
                               "'spawn'")
        shared.handle.close()
        del _SHARED[key]


def _release(shared: _Shared) -> None:
    """One Reader fewer on `shared`; the last one closes it. A handle inherited from the parent of a
    forked process is the parent's: the child leaves it alone."""
    if shared.pid != os.getpid():
        return
    shared.users -= 1
    if shared.users == 0:
        shared.handle.close()
        for key in [k for k, v in _SHARED.items() if v is shared]:
            del _SHARED[key]


class Reader:
    """Key-ordered read access to an LMDB or LevelDB database."""

    def __init__(self, path: str | os.PathLike, backend: str | None = None):
        self.path = Path(path)
        self.backend = backend or detect_backend(self.path)
        self._shared, self._open = None, 0  # the shared handle; snapshots this Reader holds on it
        try:
            if self.backend == "lmdb":
                self._shared = _acquire(self.path, "lmdb", self._open_lmdb)
                self.env, self.db = self._shared.handle, None
            else:
                self._shared = _acquire(self.path, "leveldb",
                                        lambda: plyvel.DB(str(self.path), create_if_missing=False))
                self.env, self.db = None, self._shared.handle
        except (lmdb.Error, plyvel.Error, OSError) as e:
            raise _storage_error(self.path, f"open {self.backend}", e) from None

    @contextmanager
    def _transaction(self, buffers: bool = False):
        """A read transaction on the LMDB, for the duration of the `with` (counted: see `_Shared`)."""
        self._shared.transactions += 1
        try:
            with self.env.begin(buffers=buffers) as txn:
                yield txn
        finally:
            self._shared.transactions -= 1

    def snapshot(self):
        """An LMDB read transaction (buffers=True) held until the Reader closes: one view of the
        database however long it is read."""
        self._shared.transactions += 1
        self._open += 1
        return self.env.begin(buffers=True)

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
            with self._transaction(buffers=buffers) as txn:
                cursor = txn.cursor()
                found = cursor.set_range(start) if start else cursor.first()
                if found:
                    yield from cursor.iternext()
        else:
            yield from self.db.iterator(start=start)

    def keys(self):
        """Every key, in key order."""
        if self.env is not None:
            with self._transaction() as txn:
                yield from txn.cursor().iternext(keys=True, values=False)
        else:
            yield from self.db.iterator(include_value=False)

    def get(self, key: bytes) -> bytes | None:
        """The value stored under `key`, or None."""
        if self.env is not None:
            with self._transaction() as txn:
                return txn.get(key)
        return self.db.get(key)

    def last_key(self) -> bytes | None:
        """The greatest key, or None for an empty database."""
        if self.env is not None:
            with self._transaction() as txn:
                cursor = txn.cursor()
                return cursor.key() if cursor.last() else None
        with self.db.iterator(reverse=True, include_value=False) as it:
            return next(it, None)

    def close(self) -> None:
        """Closes this reader (a database shared with other readers stays open for them)."""
        if self._shared is not None:
            self._shared.transactions -= self._open
            _release(self._shared)
        self._shared = self.env = self.db = None
        self._open = 0
