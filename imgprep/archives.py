"""Reading images straight from an uncompressed tar, nested tars included, without unpacking it.

One pass over the archive's headers (data blocks are skipped by seeking) gives every regular
member's name, data offset and size: the index. A member of a nested tar is named as the
unpacked tree would name it (`n01440764.tar` holding `n01440764_10026.JPEG` gives
`n01440764/n01440764_10026.JPEG`) and its offset is absolute in the outer file (the outer
member's data offset plus the inner header's data offset), so a worker reads any image with one
`pread`.

The index is a file in the cache folder (`$XDG_CACHE_HOME/imgprep/archive-index`, else
`~/.cache/imgprep/archive-index`), one per archive path, keyed by the archive's resolved path,
size and modification time: `make-lists`, every `build-lmdb` and `resize` of the same archive share
one pass, `--overwrite` of an output never throws it away, and nothing is written beside the
user's archive. Its layout: a magic line, a JSON header line, zero padding to 8 bytes, then int64
data offsets, int64 sizes, int64 name ends and the names (UTF-8, surrogate escapes for other
bytes), sorted by name. Workers map it read-only, so its pages are shared between them.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import tarfile
from pathlib import Path

import numpy as np

from . import ImgprepError
from .imageops import ImageFailure
from .progress import Progress

INDEX_MAGIC = b"imgprep-archive-index/1\n"
BLOCK = tarfile.BLOCKSIZE
COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
NAME_ENCODING = ("utf-8", "surrogateescape")


def cache_dir() -> Path:
    """Where imgprep keeps what it can always make again (archive indexes)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "imgprep"


def compression(path: Path) -> str | None:
    with open(path, "rb") as f:
        head = f.read(6)
    return next((kind for magic, kind in COMPRESSED_MAGIC.items() if head.startswith(magic)), None)


def member_name(name: str) -> str:
    """A member's name as `tar x` would place it: no leading `/` or `./`."""
    name = name.lstrip("/")
    while name.startswith("./"):
        name = name[2:].lstrip("/")
    return name


def _truncated(where: str, member: str, needs: int, has: int) -> ImgprepError:
    return ImgprepError(f"{where} is truncated: member {member!r} needs {needs:,} bytes but it ends after "
                        f"{has:,}; the download or copy is incomplete: fetch it again")


def _walk_tar(fileobj, base: int, limit: int, prefix: str, archive: str, entries: dict, progress) -> None:
    """Adds `name -> (absolute data offset, size)` for every regular member of the tar in `fileobj`
    (which starts at byte `base` of the archive and holds `limit` bytes); recurses into `.tar`
    members. A cut or corrupt header is an error naming the last good member."""
    where = f"member {prefix.rstrip('/')}.tar of {archive}" if prefix else archive
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r:")
    except tarfile.TarError as e:
        raise ImgprepError(f"{where} is not a readable tar archive ({e})") from None
    last = None
    while True:
        try:
            member = tar.next()
        except tarfile.TarError as e:
            after = f"after member {prefix + member_name(last)!r}" if last else "at its start"
            raise ImgprepError(f"{where} is corrupt {after}: {e}") from None
        if member is None:
            break
        tar.members.clear()  # tarfile keeps every TarInfo; 1.28M of them would cost ~1 GB
        name = prefix + member_name(member.name)
        if ".." in name.split("/"):
            raise ImgprepError(f"{where} holds member {member.name!r}, whose '..' would place it outside the "
                               "folder it is unpacked into; imgprep refuses such archives (as tar x skips such members)")
        if member.offset_data + member.size > limit:
            raise _truncated(where, name, base + member.offset_data + member.size, base + limit)
        if member.isreg() and not member.issparse():
            if name.lower().endswith(".tar"):
                _walk_tar(tar.extractfile(member), base + member.offset_data, member.size, name[:-4] + "/",
                          archive, entries, progress)
            else:
                entries[name] = (base + member.offset_data, member.size)
                progress.update()
        last = member.name
    # tarfile ends quietly at a header it cannot read; only tar's zero blocks end an archive
    fileobj.seek(tar.offset)
    block = fileobj.read(BLOCK) if tar.offset < limit else b""
    after = f"after member {prefix + member_name(last)!r}" if last else "at its start"
    if len(block) < BLOCK:
        raise ImgprepError(f"{where} is truncated: it ends {after} without tar's end-of-archive blocks; the "
                           "download or copy is incomplete: fetch it again")
    if block.strip(b"\0"):
        raise ImgprepError(f"{where} is corrupt {after}: the next header (byte {base + tar.offset:,}) is not a "
                           "tar header")


def index_archive(path: Path, show_progress: bool = True) -> dict[str, tuple[int, int]]:
    """One pass over the headers of the tar at `path` (data blocks skipped): member name ->
    (absolute data offset, size), nested tars resolved."""
    kind = compression(path)
    if kind:
        raise ImgprepError(f"{path} is {kind}-compressed; images are read from an uncompressed tar at their "
                           "offsets (ImageNet's image archives are uncompressed): decompress it once "
                           f"({'gunzip' if kind == 'gzip' else kind + ' -d'}) or unpack it")
    entries: dict[str, tuple[int, int]] = {}
    progress = Progress(f"indexing {path.name}", None, unit="members", enabled=show_progress)
    try:
        with open(path, "rb") as f:
            _walk_tar(f, 0, os.fstat(f.fileno()).st_size, "", str(path), entries, progress)
    except OSError as e:
        raise ImgprepError(f"cannot read {path}: {e.strerror or e}") from None
    progress.finish(f"indexed {path}: {len(entries):,} files in {progress.elapsed:.1f}s")
    return entries


def _key(path: Path) -> dict:
    st = os.stat(path)
    return {"archive": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def index_path(key: dict) -> Path:
    return cache_dir() / "archive-index" / (hashlib.sha256(key["archive"].encode(*NAME_ENCODING)).hexdigest()[:24]
                                            + ".idx")


def write_index(target: Path, key: dict, entries: dict[str, tuple[int, int]]) -> None:
    names = sorted(name.encode(*NAME_ENCODING) for name in entries)
    located = [entries[name.decode(*NAME_ENCODING)] for name in names]
    offsets = np.array([o for o, _ in located], dtype="<i8")
    sizes = np.array([s for _, s in located], dtype="<i8")
    ends = np.cumsum([len(n) for n in names], dtype="<i8")
    header = INDEX_MAGIC + json.dumps(dict(key, count=len(names))).encode() + b"\n"
    header += b"\0" * (-len(header) % 8)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for part in (header, offsets.tobytes(), sizes.tobytes(), ends.tobytes(), b"".join(names)):
                f.write(part)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


class ArchiveIndex:
    """A mapped index file: lookups by binary search over the sorted names."""

    def __init__(self, path: Path):
        with open(path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if not self.map[:len(INDEX_MAGIC)] == INDEX_MAGIC:
            raise ValueError("not an imgprep archive index")
        end = self.map.find(b"\n", len(INDEX_MAGIC))
        self.key = json.loads(self.map[len(INDEX_MAGIC):end])
        start = end + 1 + (-(end + 1) % 8)
        n = self.count = self.key.pop("count")
        self.offsets, self.sizes, self.ends = (np.frombuffer(self.map, "<i8", n, start + 8 * n * i) for i in range(3))
        self.names_at = start + 24 * n
        if self.names_at + (int(self.ends[-1]) if n else 0) != len(self.map):
            raise ValueError("index file has the wrong length")

    def name(self, i: int) -> bytes:
        begin = int(self.ends[i - 1]) if i else 0
        return self.map[self.names_at + begin:self.names_at + int(self.ends[i])]

    def find(self, rel: str) -> int:
        """The member's position, or -1."""
        wanted = rel.encode(*NAME_ENCODING)
        lo, hi = 0, self.count
        while lo < hi:
            mid = (lo + hi) // 2
            if self.name(mid) < wanted:
                lo = mid + 1
            else:
                hi = mid
        return lo if lo < self.count and self.name(lo) == wanted else -1

    def names(self) -> list[str]:
        blob = self.map[self.names_at:]
        bounds = [0, *self.ends.tolist()]
        return [blob[a:b].decode(*NAME_ENCODING) for a, b in zip(bounds, bounds[1:])]


def load_index(path: Path, show_progress: bool = True) -> tuple[dict, Path]:
    """(key, index file) for the archive at `path`: the cached index when its key matches the archive
    as it is now, else a new one from one pass over the headers."""
    key = _key(path)
    target = index_path(key)
    try:
        if ArchiveIndex(target).key == key:
            return key, target
    except (OSError, ValueError):
        pass
    entries = index_archive(path, show_progress)
    try:
        write_index(target, key, entries)
    except OSError as e:
        raise ImgprepError(f"cannot write the index of {path} to {target}: {e.strerror or e}; set XDG_CACHE_HOME "
                           "to a writable folder") from None
    return key, target


_OPENED: dict = {}  # per process: (archive, size, mtime_ns) -> (pid, fd, ArchiveIndex)


class TarSource:
    """Members of an uncompressed tar, named as the unpacked tree names its files. Pickles as its
    key only: each worker process opens the archive and maps the index once, on first use."""

    def __init__(self, path: Path, key: dict, index_file: Path):
        self.path = Path(path)
        self.key = key
        self.index_file = index_file

    @classmethod
    def open(cls, path, show_progress: bool = True) -> "TarSource":
        path = Path(path)
        key, index_file = load_index(path, show_progress)
        source = cls(path, key, index_file)
        source._opened()
        return source

    def _opened(self) -> tuple[int, ArchiveIndex]:
        slot = (self.key["archive"], self.key["size"], self.key["mtime_ns"])
        found = _OPENED.get(slot)
        if found and found[0] == os.getpid():
            return found[1], found[2]
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ImgprepError(f"cannot read {self.path}: {e.strerror or e}") from None
        st = os.fstat(fd)
        if (st.st_size, st.st_mtime_ns) != (self.key["size"], self.key["mtime_ns"]):
            os.close(fd)
            raise ImgprepError(f"{self.path} changed (size or modification time) since it was indexed; run the "
                               "command again")
        try:
            index = ArchiveIndex(self.index_file)
            if index.key != self.key:
                raise ValueError("stale")
        except (OSError, ValueError):  # a worker on another machine: index the archive there
            index = ArchiveIndex(load_index(self.path, show_progress=False)[1])
        _OPENED[slot] = (os.getpid(), fd, index)
        return fd, index

    def __getstate__(self):
        return {"path": self.path, "key": self.key, "index_file": self.index_file}

    def read(self, rel: str) -> bytes:
        fd, index = self._opened()
        i = index.find(rel)
        if i < 0:
            raise ImageFailure("missing", f"no member {rel} in {self.path}")
        size, offset = int(index.sizes[i]), int(index.offsets[i])
        try:
            data = os.pread(fd, size, offset)
        except OSError as e:
            raise ImageFailure("unreadable", f"{self.describe(rel)}: {e.strerror or e}") from None
        if len(data) != size:
            raise ImageFailure("unreadable", f"{self.describe(rel)}: the archive holds only {len(data):,} of its "
                                             f"{size:,} bytes (cut short since it was indexed)")
        return data

    def members(self) -> list[str]:
        """Every regular member, sorted, nested tars' members as `<tar name>/<member>`."""
        return self._opened()[1].names()

    def describe(self, rel: str) -> str:
        return f"{self.path}:{rel}"

    def mtime_ns(self, rel: str) -> int:
        return self.key["mtime_ns"]

    def identity(self) -> dict:
        """What a build records of its source: the resolved archive, its size and modification time."""
        return {"root": self.key["archive"], "archive_size": self.key["size"],
                "archive_mtime_ns": self.key["mtime_ns"]}
