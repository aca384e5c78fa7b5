"""Reading images straight from an uncompressed tar, nested tars included, without unpacking it.

One pass over the archive's headers (data blocks are skipped by seeking) gives every regular
member's name, data offset, size and a digest of its tar header: the index. A member of a nested
tar is named as the unpacked tree would name it (`n01440764.tar` holding `n01440764_10026.JPEG`
gives `n01440764/n01440764_10026.JPEG`) and its offset is absolute in the outer file (the outer
member's data offset plus the inner header's data offset), so a worker reads any image with one
`pread`: its header block and its data together. A header that is not the one indexed means the
archive changed: an error, never another member's bytes. A hard link reads its target's data, a
GNU sparse member is expanded; a symbolic link or device member is a failure of that member.

The index is a file in the cache folder (`$XDG_CACHE_HOME/imgprep/archive-index`, else
`~/.cache/imgprep/archive-index`), one per archive path, reused while the archive's resolved path,
size, modification and change times, inode and device are those it was made from: `make-lists`,
every `build-lmdb` and `resize` of the same archive share one pass, `--overwrite` of an output never
throws it away, and nothing is written beside the user's archive. Its layout: a magic line, a JSON
header line (that key, the member count, the sha256 of what follows, the sparse maps and the failing
members), zero padding to 8 bytes, then int64 data offsets (-1: a failing member), int64 sizes,
uint64 header digests, int64 name ends and the names (UTF-8, surrogate escapes for other bytes),
sorted by name. A damaged index is made again, with a warning. Workers map it read-only, so its
pages are shared between them.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import posixpath
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgprep import ImgprepError
from imgprep.formats.imageops import ImageFailure
from imgprep.prepare.progress import Progress
from imgprep.formats.files import open_user_file

INDEX_MAGIC = b"imgprep-archive-index/2\n"
INDEX_FAMILY = b"imgprep-archive-index/"  # older versions' indexes are made again without a warning
KEY_FIELDS = ("archive", "size", "mtime_ns", "ctime_ns", "inode", "device")
BLOCK = tarfile.BLOCKSIZE
COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
NAME_ENCODING = ("utf-8", "surrogateescape")
SPARSE_LIMIT = 1 << 30  # a sparse member expanding beyond this is no image: a failure, not 1 GiB of zeros


def cache_dir() -> Path:
    """Where imgprep keeps what it can always make again (archive indexes)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "imgprep"


def compression_of(head: bytes) -> str | None:
    """'gzip', 'bzip2', 'xz' or 'zstd' for data starting with `head` (6 bytes suffice), else None."""
    return next((kind for magic, kind in COMPRESSED_MAGIC.items() if head.startswith(magic)), None)


def compression(path: Path) -> str | None:
    """The compression of the file at `path` (see `compression_of`); only a regular file is read."""
    with open_user_file(path, "archive") as f:
        return compression_of(f.read(6))


def decompress_command(kind: str) -> str:
    """The shell command that decompresses a file of this compression kind."""
    return "gunzip" if kind == "gzip" else f"{kind} -d"


def member_name(name: str) -> str:
    """A member's (or a list entry's) path as `tar x` would place it: no leading `/` or `./`, no
    `//` or `/./`. Both sides of a lookup go through it, so `./a//b.JPEG` finds member `a/b.JPEG`."""
    name = posixpath.normpath(name.lstrip("/")) if name else name
    return "" if name == "." else name


def header_digest(block: bytes) -> int:
    """What the index keeps of a member's 512-byte tar header, to know it again when reading."""
    return int.from_bytes(hashlib.blake2b(block, digest_size=8).digest(), "little")


def _truncated(where: str, member: str, needs: int, has: int) -> ImgprepError:
    return ImgprepError(f"{where} is truncated: member {member!r} needs {needs:,} bytes but it ends after "
                        f"{has:,}; the download or copy is incomplete: fetch it again")


@dataclass
class Members:
    """What one pass over an archive's headers finds: name -> (absolute data offset, size, header
    digest) for readable members; name -> [[offset in the member, bytes], ...] for sparse ones
    (their data stored back to back from the offset); name -> (reason, detail) for failing ones."""

    entries: dict = field(default_factory=dict)
    sparse: dict = field(default_factory=dict)
    failures: dict = field(default_factory=dict)


def _link_failure(member: tarfile.TarInfo, where: str) -> tuple[str, str] | None:
    """The failure a member that is no file stands for (a symbolic link, a device, a FIFO), or None."""
    if member.issym():
        what = f"a symbolic link (to {member.linkname!r})"
    elif member.ischr() or member.isblk():
        what = "a device"
    elif member.isfifo():
        what = "a FIFO"
    else:
        return None
    return "not-a-file", f"member {member.name!r} of {where} is {what}; imgprep reads an archive's regular members only"


def _sparse_map(member: tarfile.TarInfo) -> tuple[list, int]:
    """A sparse member's chunks ([offset in the member, bytes]) and the bytes they take in the archive."""
    chunks = [[int(o), int(n)] for o, n in member.sparse if n]
    return chunks, sum(n for _, n in chunks)


def _forget(found: Members, name: str) -> None:
    """A later member of the same name replaces an earlier one, as `tar x` does."""
    for kept in (found.entries, found.sparse, found.failures):
        kept.pop(name, None)


def _walk_tar(fileobj, base: int, limit: int, prefix: str, archive: str, found: Members, progress,
              tar_name: str = "") -> None:
    """Adds every member of the tar in `fileobj` (which starts at byte `base` of the archive and
    holds `limit` bytes) to `found`; recurses into `.tar` members (`tar_name`: the member being
    read). A cut or corrupt header is an error naming the last good member."""
    where = f"member {tar_name} of {archive}" if tar_name else archive
    if tar_name:
        kind = compression_of(fileobj.read(6))
        fileobj.seek(0)
        if kind:
            raise ImgprepError(f"{tar_name} in {archive} is {kind}-compressed; ILSVRC2012's class tars are plain "
                               f"tar: {decompress_command(kind)} it and pack the train tar again, or unpack the "
                               "train tar and build from the folders")
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
        if ".." in member.name.split("/"):
            raise ImgprepError(f"{where} holds member {member.name!r}, whose '..' would place it outside the "
                               "folder it is unpacked into; imgprep refuses such archives (as tar x skips such "
                               "members)")
        name = prefix + member_name(member.name)
        last = member.name
        sparse, stored = _sparse_map(member) if member.issparse() else (None, member.size)
        if member.offset_data + stored > limit:
            raise _truncated(where, name, base + member.offset_data + stored, base + limit)
        if name == prefix:
            continue  # the archive's own folder (`./`)
        if member.isreg():
            if name.lower().endswith(".tar") and sparse is None:
                _walk_tar(tar.extractfile(member), base + member.offset_data, member.size, name[:-4] + "/",
                          archive, found, progress, tar_name=name)
                continue
            _forget(found, name)
            if sparse is not None and (member.size > SPARSE_LIMIT
                                       or any(o < 0 or o + n > member.size for o, n in sparse)):
                found.failures[name] = ("unreadable", f"member {member.name!r} of {where} is a sparse file of "
                                        f"{member.size:,} bytes whose map does not fit it, or too large for an image")
            else:
                fileobj.seek(member.offset_data - BLOCK)
                found.entries[name] = (base + member.offset_data, member.size, header_digest(fileobj.read(BLOCK)))
                if sparse is not None:
                    found.sparse[name] = sparse
            progress.update()
        elif member.islnk():
            target = prefix + member_name(member.linkname)
            _forget(found, name)
            if target in found.entries:
                found.entries[name] = found.entries[target]
                if target in found.sparse:
                    found.sparse[name] = found.sparse[target]
            elif target in found.failures:
                found.failures[name] = found.failures[target]
            else:
                found.failures[name] = ("missing", f"member {member.name!r} of {where} is a hard link to "
                                        f"{member.linkname!r}, which the archive does not hold before it")
            progress.update()
        else:
            failure = _link_failure(member, where)
            if failure:
                _forget(found, name)
                found.failures[name] = failure
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


def index_archive(path: Path, show_progress: bool = True) -> Members:
    """One pass over the headers of the tar at `path` (data blocks skipped): its members, nested tars
    resolved."""
    members = Members()
    progress = Progress(f"indexing {path.name}", None, unit="members", enabled=show_progress)
    with open_user_file(path, "archive") as f:
        kind = compression_of(f.read(6))
        if kind:
            raise ImgprepError(f"{path} is {kind}-compressed; images are read from an uncompressed tar at their "
                               "offsets (ImageNet's image archives are uncompressed): decompress it once "
                               f"({decompress_command(kind)}) or unpack it")
        f.seek(0)
        try:
            _walk_tar(f, 0, os.fstat(f.fileno()).st_size, "", str(path), members, progress)
        except OSError as e:
            raise ImgprepError(f"cannot read {path}: {e.strerror or e}") from None
    count = len(members.entries) + len(members.failures)
    progress.finish(f"indexed {path}: {count:,} files in {progress.elapsed:.1f}s")
    return members


def archive_key(path: Path) -> dict:
    """What the index of the archive at `path` is kept for: any rewrite changes the change time (and
    a copy the inode), even when size and modification time are made the same again."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ImgprepError(f"cannot read {path}: {e.strerror or e}") from None
    return {"archive": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns, "inode": st.st_ino, "device": st.st_dev}


def index_path(key: dict) -> Path:
    """Where the cached offset index of the archive that `key` identifies lives."""
    return cache_dir() / "archive-index" / (hashlib.sha256(key["archive"].encode(*NAME_ENCODING)).hexdigest()[:24]
                                            + ".idx")


def _body_sha256(parts, sparse: dict, failures: dict) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    digest.update(json.dumps([sparse, failures], sort_keys=True).encode())
    return digest.hexdigest()


def write_index(target: Path, key: dict, members: Members) -> None:
    """The index file of `members` (see the module's docstring for its layout), replacing `target`."""
    names = sorted(name.encode(*NAME_ENCODING) for name in (*members.entries, *members.failures))
    located = [members.entries.get(name.decode(*NAME_ENCODING), (-1, 0, 0)) for name in names]
    offsets = np.array([o for o, _, _ in located], dtype="<i8")
    sizes = np.array([s for _, s, _ in located], dtype="<i8")
    digests = np.array([d for _, _, d in located], dtype="<u8")
    ends = np.cumsum([len(n) for n in names], dtype="<i8")
    parts = [offsets.tobytes(), sizes.tobytes(), digests.tobytes(), ends.tobytes(), b"".join(names)]
    sparse = {name: members.sparse[name] for name in sorted(members.sparse)}
    failures = {name: list(members.failures[name]) for name in sorted(members.failures)}
    header = dict(key, count=len(names), sha256=_body_sha256(parts, sparse, failures), sparse=sparse,
                  failures=failures)
    head = INDEX_MAGIC + json.dumps(header).encode() + b"\n"
    head += b"\0" * (-len(head) % 8)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for part in (head, *parts):
                f.write(part)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


class OutdatedIndex(ValueError):
    """An index written by an older imgprep: made again, without a warning."""


_HASHES: dict = {}  # per interpreter: (index sha256, count) -> ArchiveIndex._hashes()


class ArchiveIndex:
    """A mapped index file: lookups by the names' hashes (`find`). A file that is not a
    whole index (of this version) is a ValueError; `verify` also checks the sha256 of its body."""

    def __init__(self, path: Path, verify: bool = False):
        try:
            with open_user_file(path, "archive index") as f:
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ImgprepError as e:
            raise (FileNotFoundError if not os.path.lexists(path) else ValueError)(str(e)) from None
        if not self.map[:len(INDEX_MAGIC)] == INDEX_MAGIC:
            if self.map[:len(INDEX_FAMILY)] == INDEX_FAMILY:
                raise OutdatedIndex("an index of an older imgprep")
            raise ValueError("not an imgprep archive index")
        end = self.map.find(b"\n", len(INDEX_MAGIC))
        if end < 0:
            raise ValueError("its header line is cut")
        try:
            header = json.loads(self.map[len(INDEX_MAGIC):end])
        except (ValueError, RecursionError) as e:
            raise ValueError(f"its header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        n = header.get("count")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"its header's count is {n!r}")
        if not (isinstance(header.get("sha256"), str) and isinstance(header.get("sparse"), dict)
                and isinstance(header.get("failures"), dict) and all(k in header for k in KEY_FIELDS)):
            raise ValueError("its header lacks fields")
        self.key = {k: header[k] for k in KEY_FIELDS}
        self.count, self.sha256, self.sparse, self.failures = n, header["sha256"], header["sparse"], header["failures"]
        start = end + 1 + (-(end + 1) % 8)
        self.names_at = start + 32 * n
        if self.names_at > len(self.map):
            raise ValueError("it is shorter than its header says")
        self.offsets, self.sizes, self.ends = (np.frombuffer(self.map, "<i8", n, start + 8 * n * i) for i in (0, 1, 3))
        self.digests = np.frombuffer(self.map, "<u8", n, start + 16 * n)
        if self.names_at + (int(self.ends[-1]) if n else 0) != len(self.map) or (n and (
                self.ends[0] < 0 or (np.diff(self.ends) < 0).any())):
            raise ValueError("its names do not fill it")
        if verify:
            with memoryview(self.map) as view, view[start:] as body:
                if _body_sha256([body], self.sparse, self.failures) != self.sha256:
                    raise ValueError("its sha256 is not the one it was written with")

    def name(self, i: int) -> bytes:
        """The name of member `i` (in sorted order), as stored bytes."""
        begin = int(self.ends[i - 1]) if i else 0
        return self.map[self.names_at + begin:self.names_at + int(self.ends[i])]

    def find(self, rel: str) -> int:
        """The member's position, or -1: one search of a sorted array of the names' hashes (see `_hashes`),
        then a comparison of the name found."""
        wanted = rel.encode(*NAME_ENCODING)
        hashes, order = self._hashes()
        h = hash(wanted)
        k = int(np.searchsorted(hashes, h))
        while k < self.count and hashes[k] == h:  # equal hashes of other names: rare, each checked
            i = int(order[k])
            if self.name(i) == wanted:
                return i
            k += 1
        return -1

    def _hashes(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted hashes of the names, the position of each), made once per index and interpreter (a
        forked worker inherits its parent's; Python's bytes hash differs between interpreters): about
        0.3 s for 1.28 million names, where a binary search over the mapped names took ~21 probes, some
        30 us, per lookup."""
        slot = (self.sha256, self.count)
        found = _HASHES.get(slot)
        if found is None:
            hashes = np.fromiter(map(hash, self._name_list()), np.int64, self.count)
            order = np.argsort(hashes, kind="stable")
            found = _HASHES[slot] = (hashes[order], order)
        return found

    def _name_list(self) -> list[bytes]:
        blob = self.map[self.names_at:]
        bounds = [0, *self.ends.tolist()]
        return [blob[a:b] for a, b in zip(bounds, bounds[1:])]

    def names(self) -> list[str]:
        """Every member name, sorted, as text."""
        return [name.decode(*NAME_ENCODING) for name in self._name_list()]


def load_index(path: Path, show_progress: bool = True) -> tuple[ArchiveIndex, Path]:
    """The index of the archive at `path` and its file: the cached one when its key matches the
    archive as it is now and it is whole, else a new one from one pass over the headers (a damaged
    one is replaced, with a warning)."""
    key = archive_key(path)
    target = index_path(key)
    try:
        index = ArchiveIndex(target, verify=True)
        if index.key == key:
            return index, target
    except (FileNotFoundError, OutdatedIndex):
        pass
    except (OSError, ValueError) as e:
        print(f"warning: the cached index {target} of {path} is damaged ({e}); indexing the archive again",
              file=sys.stderr)
    members = index_archive(path, show_progress)
    if archive_key(path) != key:
        raise ImgprepError(f"{path} changed while it was indexed; run the command again once nothing writes to it")
    try:
        write_index(target, key, members)
    except OSError as e:
        raise ImgprepError(f"cannot write the index of {path} to {target}: {e.strerror or e}; set XDG_CACHE_HOME "
                           "to a writable folder") from None
    return ArchiveIndex(target), target


def _changed(path: Path, why: str) -> ImgprepError:
    return ImgprepError(f"{path} changed since it was indexed ({why}): it was replaced or rewritten; make sure "
                        "nothing writes to it, then run the command again (it is indexed anew)")


_OPENED: dict = {}  # per process: (archive, members sha256) -> (pid, fd, ArchiveIndex)


class TarSource:
    """Members of an uncompressed tar, named as the unpacked tree names its files. Pickles as its
    key only: each worker process opens the archive and maps the index once, on first use."""

    def __init__(self, path: Path, key: dict, index_file: Path, members_sha256: str):
        self.path = Path(path)
        self.key = key
        self.index_file = index_file
        self.members_sha256 = members_sha256

    @classmethod
    def open(cls, path, show_progress: bool = True) -> "TarSource":
        """The archive at `path` with its offset index (made with one pass over its headers if not cached)."""
        path = Path(path)
        index, index_file = load_index(path, show_progress)
        source = cls(path, index.key, index_file, index.sha256)
        source._opened()
        return source

    def _opened(self) -> tuple[int, ArchiveIndex]:
        slot = (self.key["archive"], self.members_sha256)
        found = _OPENED.get(slot)
        if found and found[0] == os.getpid():
            return found[1], found[2]
        with open_user_file(self.path, "archive") as f:
            fd = os.dup(f.fileno())
        st = os.fstat(fd)
        if (st.st_size, st.st_mtime_ns) != (self.key["size"], self.key["mtime_ns"]):
            os.close(fd)
            raise _changed(self.path, "its size or modification time")
        try:
            index = ArchiveIndex(self.index_file)
            if index.key != self.key or index.sha256 != self.members_sha256:
                raise ValueError("stale")
        except (OSError, ValueError):  # a worker on another machine: index the archive there
            index = load_index(self.path, show_progress=False)[0]
            if index.sha256 != self.members_sha256:
                os.close(fd)
                raise _changed(self.path, "its members are not those indexed") from None
        _OPENED[slot] = (os.getpid(), fd, index)
        return fd, index

    def __getstate__(self):
        return {"path": self.path, "key": self.key, "index_file": self.index_file,
                "members_sha256": self.members_sha256}

    def read(self, rel: str) -> bytes:
        """The bytes of member `rel` (as a list names it: `./` and `//` are resolved as `tar x` would);
        a missing or failing member is an ImageFailure; a tar header that is not the one indexed
        means the archive changed: an ImgprepError."""
        fd, index = self._opened()
        name = member_name(rel)
        i = index.find(name)
        if i < 0:
            raise ImageFailure("missing", f"no member {rel} in {self.path}")
        offset, size = int(index.offsets[i]), int(index.sizes[i])
        if offset < 0:
            raise ImageFailure(*index.failures[name])
        chunks = index.sparse.get(name) if index.sparse else None
        stored = sum(n for _, n in chunks) if chunks else size
        try:
            data = os.pread(fd, BLOCK + stored, offset - BLOCK)
        except OSError as e:
            raise ImageFailure("unreadable", f"{self.describe(rel)}: {e.strerror or e}") from None
        if len(data) >= BLOCK and header_digest(data[:BLOCK]) != int(index.digests[i]):
            raise _changed(self.path, f"the tar header before member {name!r}, at byte {offset - BLOCK:,}, is not "
                                      "the one indexed")
        if len(data) != BLOCK + stored:
            raise ImageFailure("unreadable", f"{self.describe(rel)}: the archive holds only "
                                             f"{max(len(data) - BLOCK, 0):,} of its {stored:,} bytes (cut short "
                                             "since it was indexed)")
        return _expand(data, chunks, size) if chunks is not None else data[BLOCK:]

    def members(self) -> list[str]:
        """Every regular member, sorted, nested tars' members as `<tar name>/<member>`."""
        return self._opened()[1].names()

    def describe(self, rel: str) -> str:
        """How a member is named in messages: ARCHIVE:MEMBER."""
        return f"{self.path}:{rel}"

    def mtime_ns(self, rel: str) -> int:
        """A member's modification time for resize's up-to-date check: the archive's own."""
        return self.key["mtime_ns"]

    def identity(self) -> dict:
        """What a build records of its source: the resolved archive, its size, modification time and
        the sha256 of its index (every member's name, place, size and header), so that `--resume`
        refuses an archive rewritten with the same size and time."""
        return {"root": self.key["archive"], "archive_size": self.key["size"],
                "archive_mtime_ns": self.key["mtime_ns"], "archive_members_sha256": self.members_sha256}


def _expand(data: bytes, chunks: list, size: int) -> bytes:
    """A sparse member's bytes: its stored chunks (after the 512-byte header in `data`) at their
    offsets, zeros between them."""
    out = bytearray(size)
    at = BLOCK
    for offset, count in chunks:
        out[offset:offset + count] = data[at:at + count]
        at += count
    return bytes(out)
