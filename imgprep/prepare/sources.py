"""Reading source images: regular files only, and never through a path that leaves the image root.

A FIFO, socket or device named like an image would block a worker forever or read endless bytes;
such entries, like missing and unreadable files, become `ImageFailure`s for the failure report.
"""

from __future__ import annotations

import os
from pathlib import Path

from imgprep import ImgprepError
from imgprep.formats.files import NotRegular, file_kind, open_regular
from imgprep.formats.imageops import ImageFailure


def read_regular_file(path: str | os.PathLike) -> bytes:
    """The bytes of an image file that is a regular file (symlinks followed); anything else is an
    `ImageFailure` (reasons `missing`, `not-a-file`, `unreadable`) for the failure report."""
    try:
        with open_regular(path) as f:
            return f.read()
    except FileNotFoundError:
        raise ImageFailure("missing", f"no such file: {path}") from None
    except NotRegular as e:
        raise ImageFailure("not-a-file", f"{path} is a {e.kind}, not a regular file") from None
    except OSError as e:
        raise ImageFailure("unreadable", f"{path}: {e.strerror or e}") from None
    except ValueError as e:  # a NUL byte in the name
        raise ImageFailure("unreadable", f"{str(path)!r}: {e}") from None


def read_source(root: Path, rel: str, allow_outside_root: bool) -> bytes:
    """An entry's file bytes; refuses paths (and symlinks) that leave ROOT unless allowed."""
    path = root / rel
    if not allow_outside_root:
        real = os.path.realpath(path)
        real_root = os.path.realpath(root)
        if os.path.commonpath([real, real_root]) != real_root:
            raise ImageFailure("outside-root", f"resolves to {real}, outside the image root")
    return read_regular_file(path)


# ---------------------------------------------------------------------------------------------
# Sources: a folder of files, or an uncompressed tar read in place by member offsets


def open_source(path, allow_outside_root: bool = False, show_progress: bool = True):
    """The images under `path`: a `TreeSource` for a folder, a `TarSource` for an uncompressed tar
    (indexed once, see archives.py). Anything else is an ImgprepError."""
    from imgprep.prepare.archives import TarSource  # archives.py reads its files through this module

    path = Path(path)
    if path.is_dir():
        return TreeSource(path, allow_outside_root)
    if path.is_file():
        return TarSource.open(path, show_progress=show_progress)
    if not path.exists():
        raise ImgprepError(f"image root {path} does not exist")
    raise ImgprepError(f"image root {path} is a {file_kind(path.stat().st_mode)}, neither a folder nor a tar archive")


class TreeSource:
    """Image files under a folder; `rel` is a '/'-separated path below it."""

    def __init__(self, root: Path, allow_outside_root: bool = False):
        self.root = Path(root)
        self.allow_outside_root = allow_outside_root

    def read(self, rel: str) -> bytes:
        """An entry's bytes, read from the tree (regular files only, never leaving ROOT unless allowed)."""
        return read_source(self.root, rel, self.allow_outside_root)

    def describe(self, rel: str) -> str:
        """How an entry is named in messages: its path."""
        return str(self.root / rel)

    def mtime_ns(self, rel: str) -> int:
        """An entry's modification time, for resize's up-to-date check."""
        return os.stat(self.root / rel).st_mtime_ns

    def identity(self) -> dict:
        """What a build records of its source: the resolved folder."""
        return {"root": os.path.realpath(self.root)}
