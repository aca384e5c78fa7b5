"""The user's files, as every command treats them.

- Files and folders are compared by identity (device and inode), never by name: a bind mount, one
  NFS export mounted at two paths, a symbolic link or a hard link names the same thing twice.
- Only regular files are read: a FIFO would block the reader forever, a device never end.
- A single-file output is written to a temporary file beside it and renamed over it, so a reader
  sees the old file or the new one, never half of one; a symbolic link at the output is refused,
  never written through.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from imgprep import ImgprepError


def link_refused(path) -> ImgprepError:
    """The one message for a symbolic link where imgprep writes."""
    return ImgprepError(f"{path} is a symbolic link; imgprep writes only files it made there. "
                        "Remove the link, then run the command again")


def file_kind(mode: int) -> str | None:
    """None for a regular file, else what it is ('FIFO', 'folder', ...)."""
    if stat.S_ISREG(mode):
        return None
    for test, name in ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


class NotRegular(ImgprepError):
    """A path imgprep was to read names a FIFO, a device, a socket or a folder; `kind` says which."""

    def __init__(self, path, kind: str):
        super().__init__(f"{path} is a {kind}, not a regular file; imgprep reads only regular files")
        self.kind = kind


def require_regular(path) -> None:
    """Refuses `path` (links followed) unless it is a regular file; FileNotFoundError where nothing is there."""
    kind = file_kind(os.stat(path).st_mode)
    if kind:
        raise NotRegular(path, kind)


def open_regular(path):
    """`path` opened for reading in binary mode, when it is a regular file (links followed); else an
    ImgprepError that says what it is. FileNotFoundError where nothing is there."""
    require_regular(path)
    # O_NONBLOCK: should the path become a FIFO after the stat, opening it still cannot block
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        kind = file_kind(os.fstat(fd).st_mode)
        if kind:
            raise NotRegular(path, kind)
    except BaseException:
        os.close(fd)
        raise
    return open(fd, "rb")


def read_regular(path) -> bytes:
    """The bytes of a regular file (see open_regular)."""
    with open_regular(path) as f:
        return f.read()


def open_user_file(path, what: str):
    """A user's file (an archive, a devkit, a label file) opened for binary reading when it is a regular
    file; otherwise an ImgprepError naming `what` and saying what is wrong (missing, a FIFO, unreadable),
    never a hang."""
    try:
        return open_regular(path)
    except FileNotFoundError:
        raise ImgprepError(f"cannot read {what}: no such file: {path}") from None
    except NotRegular as e:
        raise ImgprepError(f"cannot read {what}: {e}") from None
    except OSError as e:
        raise ImgprepError(f"cannot read {what}: {path}: {e.strerror or e}") from None
    except ValueError as e:  # a NUL byte in the name
        raise ImgprepError(f"cannot read {what}: {str(path)!r}: {e}") from None


def read_user_file(path, what: str) -> bytes:
    """The bytes of a user's regular file (see `open_user_file`)."""
    with open_user_file(path, what) as f:
        try:
            return f.read()
        except OSError as e:
            raise ImgprepError(f"cannot read {what} {path}: {e.strerror or e}") from None


def identity(path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of what `path` names, links followed; None where nothing is there."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_dev, st.st_ino


def _folders_above(path) -> list[tuple[int, int]]:
    """The identities of the existing folders above `path` (resolved), nearest first."""
    return [ident for ident in map(identity, Path(os.path.realpath(path)).parents) if ident is not None]


def _output_key(path):
    """What two names of one output share: its identity, or its folder's identity and its name."""
    return identity(path) or (identity(Path(path).parent) or os.path.realpath(Path(path).parent), Path(path).name)


def refuse_overlaps(inputs, outputs, what: str) -> None:
    """Refuses an input named twice, an output named twice, and an output that is an input or one of
    an input folder's files, lies inside an input, or holds one. Compared by identity, so aliases of
    every kind (bind mounts, NFS mounted twice, symbolic and hard links) are recognised."""
    seen: dict = {}
    for path in map(Path, inputs):
        ident = identity(path)
        if ident is None:
            continue  # the command's own check names it
        if ident in seen:
            also = "" if str(seen[ident]) == str(path) else f" (as {seen[ident]} and {path})"
            raise ImgprepError(f"the {what} {path} is given twice{also}; each {what} counts once")
        seen[ident] = path
    files = {}  # the files directly in each input folder (a database's files)
    for path in seen.values():
        if path.is_dir():
            with os.scandir(path) as entries:
                for entry in entries:
                    try:
                        st = entry.stat()
                    except OSError:
                        continue
                    files.setdefault((st.st_dev, st.st_ino), path)
    named = {}
    for out in map(Path, outputs):
        key = _output_key(out)
        if key in named:
            raise ImgprepError(f"the outputs {named[key]} and {out} are the same file; give each its own name")
        named[key] = out
        destroys = f", which writing it would destroy; write it outside every {what}"
        ident = identity(out)
        if ident in seen:
            raise ImgprepError(f"output {out} is the {what} {seen[ident]}{destroys}")
        for folder in _folders_above(out):
            if folder in seen:
                raise ImgprepError(f"output {out} lies inside the {what} {seen[folder]}{destroys}")
        if ident in files:
            raise ImgprepError(f"output {out} is a file of the {what} {files[ident]}{destroys}")
        if ident is not None:
            for path in seen.values():
                if ident in _folders_above(path):
                    raise ImgprepError(f"output {out} holds the {what} {path}; write it outside every {what}")


def check_output_file(path, overwrite: bool = True) -> None:
    """Before any work: `path` can be written as a single-file output (write_atomic): its folder
    exists and is writable, and it is not a link, a folder or another special file. Without
    `overwrite`, an existing file is refused."""
    path = Path(path)
    if os.path.islink(path):
        raise link_refused(path)
    try:
        kind = file_kind(os.stat(path).st_mode)
    except FileNotFoundError:
        pass
    else:
        if kind:
            raise ImgprepError(f"{path} is a {kind}; imgprep replaces only regular files. Choose another name")
        if not overwrite:
            raise ImgprepError(f"{path} exists; pass --overwrite to replace it")
    folder = path.parent
    if not folder.is_dir():
        raise ImgprepError(f"cannot write {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ImgprepError(f"cannot write {path}: the folder {folder} is not writable")


def write_atomic(path, data: bytes, sync: bool = True) -> None:
    """Writes `path` as a temporary file beside it, then renames it over `path`: a reader sees the
    old file or the new one, never half of one; a stopped or failed write leaves the old file whole
    and no temporary file. A symbolic link at `path` is refused. With `sync`, the data reaches the
    disk before the rename."""
    path = Path(path)
    if os.path.islink(path):
        raise link_refused(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:  # left by a killed run of a process with the same id
            os.unlink(tmp)
            fd = os.open(tmp, flags, 0o666)
        try:
            with open(fd, "wb") as f:
                f.write(data)
                if sync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as e:
        raise ImgprepError(f"cannot write {path}: {e.strerror or e}") from None
