"""An output folder's bookkeeping: the build manifest (`imgprep-build.json`: identity and state),
the failure report's name, the folder's writer lock, and what in the folder imgprep may delete.

imgprep writes and deletes only inside OUT, and only what it made: its own sidecar files and the
files of an LMDB or LevelDB database, recognised by their structure (not just by their names). It
never writes through a symbolic link it did not make, and it takes OUT's lock before it deletes or
writes anything there.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from imgprep import ImgprepError
from imgprep.formats.files import NotRegular, file_kind, link_refused, open_regular, read_regular

MANIFEST = "imgprep-build.json"
FAILURES = "imgprep-failures.tsv"
LOCK = "imgprep.lock"
MANIFEST_FORMAT = "imgprep-build/2"
OLD_FORMATS = ("imgprep-build/1",)  # readable; not resumable (other order, identity without ROOT)
STATES = ("building", "failed", "complete", "partial")
OWN_FILES = (MANIFEST, MANIFEST + ".tmp", FAILURES)

LMDB_FILES = ("data.mdb", "lock.mdb")
LMDB_MAGIC = (0xBEEFC0DE).to_bytes(4, "little")  # MDB_meta's mm_magic, after the 16-byte page header
LEVELDB_FILE = re.compile(r"CURRENT|LOCK|LOG|LOG\.old|MANIFEST-\d+|\d+\.(log|ldb|sst|dbtmp)")


def file_sha256(path: Path) -> str:
    """The sha256 of a file's content, as hex (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _invalid(out: Path, why: str) -> ImgprepError:
    return ImgprepError(f"{out / MANIFEST} is not a valid imgprep manifest ({why}); it was not written by "
                        "imgprep or was edited")


def check_manifest(out: Path, manifest) -> dict:
    """The manifest itself when it has the shape imgprep writes, else a clear error."""
    if not isinstance(manifest, dict):
        raise _invalid(out, f"a JSON {type(manifest).__name__}, not an object")
    if manifest.get("format") not in (MANIFEST_FORMAT, *OLD_FORMATS):
        raise _invalid(out, f"format {manifest.get('format')!r}")
    if manifest.get("state") not in STATES:
        raise _invalid(out, f"state {manifest.get('state')!r}")
    identity = manifest.get("identity")
    if not isinstance(identity, dict):
        raise _invalid(out, "no identity")
    if identity.get("backend") not in ("lmdb", "leveldb"):
        raise _invalid(out, f"backend {identity.get('backend')!r}")
    shards, index = identity.get("num_shards"), identity.get("shard_index")
    if not (isinstance(shards, int) and isinstance(index, int) and 0 <= index < shards):
        raise _invalid(out, f"shard {index!r} of {shards!r}")
    for key in ("records", "failures"):
        if key in manifest and not (isinstance(manifest[key], int) and manifest[key] >= 0):
            raise _invalid(out, f"{key} {manifest[key]!r}")
    if not isinstance(manifest.get("failure_reasons", {}), dict):
        raise _invalid(out, "failure_reasons is not an object")
    return manifest


def read_manifest(out: Path) -> dict | None:
    """OUT's manifest (validated), or None where there is none. Every reader and writer of a
    database folder reads it first, so this is where a folder whose database or imgprep files are
    not all regular files is refused (refuse_special_files)."""
    out = Path(out)
    refuse_special_files(out)
    try:
        text = read_regular(out / MANIFEST).decode()
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ImgprepError(f"cannot read {out / MANIFEST}: {e}") from None
    try:
        manifest = json.loads(text)
    except ValueError as e:
        raise _invalid(out, f"not JSON: {e}") from None
    return check_manifest(out, manifest)


def open_own(path: Path, append: bool = False):
    """Opens a file imgprep makes in OUT for writing (text, bytes kept as written), never through a
    symbolic link someone else put there."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise link_refused(path) from None
        raise ImgprepError(f"cannot write {path}: {e.strerror}") from None
    return open(fd, "a" if append else "w", encoding="utf-8", errors="surrogateescape")


def write_manifest(out: Path, manifest: dict) -> None:
    """Writes OUT's manifest atomically: to imgprep-build.json.tmp (a link or leftover there is replaced, never
    written through), synced, then renamed."""
    tmp = out / (MANIFEST + ".tmp")
    try:
        os.unlink(tmp)  # imgprep's own name: a link or leftover there is replaced, never written through
    except FileNotFoundError:
        pass
    with open_own(tmp) as f:
        f.write(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / MANIFEST)


class OutputLock:
    """An exclusive lock on the output folder, so two writers never share one folder. It is taken
    before anything in the folder is deleted or written."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK
        self.fd = None
        self.created = False

    def __enter__(self):
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            try:
                self.fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o666)
                self.created = True
            except FileExistsError:
                self.fd = os.open(self.path, flags)
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise ImgprepError(f"{self.path.parent} is being written by another imgprep process") from None
        except OSError as e:
            if self.fd is not None:
                os.close(self.fd)
            if e.errno == errno.ELOOP:
                raise link_refused(self.path) from None
            raise ImgprepError(f"cannot write to {self.path.parent}: {e.strerror}") from None
        return self

    def __exit__(self, kind, *exc):
        if self.created and kind is not None and issubclass(kind, ImgprepError):
            self.path.unlink(missing_ok=True)  # a refusal leaves no trace of imgprep in the folder
        os.close(self.fd)



def database_kind(path: Path) -> str | None:
    """'lmdb' or 'leveldb' when `path` holds such a database (checked by its structure: LMDB's
    meta-page magic, LevelDB's CURRENT naming an existing MANIFEST file), else None."""
    path = Path(path)
    try:
        with open_regular(path / "data.mdb") as f:
            if f.read(20)[16:20] == LMDB_MAGIC:
                return "lmdb"
    except OSError:
        pass
    try:
        current = read_regular(path / "CURRENT").decode(errors="replace")
    except OSError:
        return None
    name = current.rstrip("\n")
    if re.fullmatch(r"MANIFEST-\d+", name) and (path / name).is_file() and current.endswith("\n"):
        return "leveldb"
    return None


def _database_files(path: Path, kind: str | None) -> list[Path]:
    if kind == "lmdb":
        return [path / n for n in LMDB_FILES if os.path.lexists(path / n)]
    if kind == "leveldb":
        return [p for p in path.iterdir() if LEVELDB_FILE.fullmatch(p.name)]
    return []


def refuse_special_files(path: Path) -> None:
    """Refuses a folder in which a database's or imgprep's file is not a regular file (links
    followed): LMDB, LevelDB and imgprep would block on a FIFO there forever. Folder entries are
    typed by the directory listing, so a LevelDB of 100,000 table files costs no stat each."""
    try:
        entries = list(os.scandir(path))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        name = entry.name
        if not (name in OWN_FILES or name in LMDB_FILES or LEVELDB_FILE.fullmatch(name)):
            continue
        try:
            if entry.is_file():
                continue
            kind = file_kind(os.stat(entry.path).st_mode)
        except FileNotFoundError:  # a dangling link: as absent as a missing file
            continue
        raise NotRegular(Path(path) / name, kind)


def contents(out: Path) -> list[str]:
    """What OUT holds besides imgprep's lock (a folder holding only the lock is empty to imgprep)."""
    try:
        return sorted(n for n in os.listdir(out) if n != LOCK)
    except FileNotFoundError:
        return []


def refuse_links(out: Path) -> None:
    """imgprep never writes through a symbolic link it did not make: refuse one under a name it writes."""
    kind = database_kind(out)
    names = [*OWN_FILES, *LMDB_FILES, "CURRENT"] + [p.name for p in _database_files(out, kind)]
    for name in names:
        if os.path.islink(out / name):
            raise link_refused(out / name)


def clear_output(out: Path) -> list[str]:
    """Deletes imgprep's sidecar files and the database's files in OUT (call it holding OUT's lock);
    anything else stays. Returns the names of what stayed. Refuses a folder holding neither a
    database nor an imgprep build."""
    out = Path(out)
    kind = database_kind(out)
    manifest_present = os.path.lexists(out / MANIFEST)
    if kind is None and not manifest_present:
        raise ImgprepError(f"{out} holds neither a database nor an imgprep build; refusing to delete "
                           "anything in it. Choose another OUT")
    # the manifest goes last: stopped half-way, the folder is still recognisably imgprep's
    for path in [*_database_files(out, kind), *(out / n for n in reversed(OWN_FILES) if os.path.lexists(out / n))]:
        path.unlink()
    return contents(out)


def require_complete(path, manifest: dict | None, allow_partial: bool) -> None:
    """The one check `compute-mean`, `inspect`, `merge` and the loader make: an imgprep build that is
    not complete is refused, unless the caller explicitly allows a partial one. A database without
    an imgprep manifest (built by Caffe, say) cannot be judged and is accepted."""
    if manifest is None or manifest["state"] == "complete" or allow_partial:
        return
    raise ImgprepError(f"{path} is an incomplete build (state {manifest['state']!r}); {finish_hint(manifest)}, "
                       "or pass --allow-partial (allow_partial=True from Python) to use the records it holds")


def made_by_merge(manifest: dict) -> bool:
    """Whether `merge` wrote this output (its manifest names the parts)."""
    return "merged_from" in manifest


def finish_hint(manifest: dict) -> str:
    """How to finish an incomplete output, read from what made it: the one hint every command and
    the loader give. A merge is finished by merge (build-lmdb --resume refuses its output)."""
    if manifest["state"] == "partial":
        return "it was merged from incomplete parts: finish the parts with build-lmdb --resume, then merge again"
    if made_by_merge(manifest):
        return "it is a merge that stopped: finish it by running the same merge command again"
    return "finish it by running the same build-lmdb command with --resume"


def record_count(reader, manifest: dict | None) -> int:
    """How many records `reader`'s database holds: LMDB knows it; a LevelDB must be walked (a raw
    ImageNet LevelDB is ~240 GB), so a complete build's manifest is trusted instead."""
    if reader.backend == "leveldb" and manifest is not None and manifest["state"] == "complete" \
            and isinstance(manifest.get("records"), int):
        return manifest["records"]
    return len(reader)


@dataclass
class Failure:
    """One entry the build could not use: its list position, path, reason (a word: truncated, missing, ...) and
    detail; one line of the failure report."""
    position: int
    path: str
    reason: str
    detail: str

    def line(self) -> str:
        """The failure report's line: position, escaped path, reason and detail, tab-separated."""
        clean = self.detail.replace("\t", " ").replace("\n", " ")
        return f"{self.position}\t{escape_path(self.path)}\t{self.reason}\t{clean}\n"


_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


_UNESCAPES = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}


def escape_path(path: str) -> str:
    """A path as the failure report's column: backslash, tab, LF and CR written as \\\\, \\t, \\n, \\r."""
    return "".join(_ESCAPES.get(c, c) for c in path)


def unescape_path(text: str) -> str:
    """The path a failure report's column names (the inverse of `escape_path`)."""
    return re.sub(r"\\(.)", lambda m: _UNESCAPES.get(m[1], m[0]), text)


def read_failures(out: Path) -> list[Failure]:
    """The failures OUT's report lists, in its order; none when there is no report."""
    failures = []
    try:
        with io.TextIOWrapper(open_regular(out / FAILURES), encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                parts = line.rstrip("\n").split("\t", 3)
                if len(parts) == 4 and parts[0].isdigit():
                    failures.append(Failure(int(parts[0]), unescape_path(parts[1]), parts[2], parts[3]))
    except FileNotFoundError:
        pass
    return failures
