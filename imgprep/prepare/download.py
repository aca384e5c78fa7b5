"""What make-lists walks: a folder of the unpacked tree, or the same tree as an archive's members;
and where the three ILSVRC2012 downloads are.

Both listings answer one question, `entries(rel)`: the sorted (name, is_folder) pairs in folder
`rel`, so that lists made from the archives and from the unpacked tree are the same file.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from imgprep import ImgprepError
from imgprep.prepare.archives import compression
from imgprep.formats.files import open_user_file

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT_TAR = "ILSVRC2012_devkit_t12.tar.gz"


class TreeListing:
    """A folder on disk."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def entries(self, rel: str = "") -> list[tuple[str, bool]]:
        """(name, is a folder) for each entry of folder `rel`, sorted by name."""
        with os.scandir(self.folder / rel if rel else self.folder) as it:
            return sorted((e.name, e.is_dir()) for e in it)

    def __str__(self) -> str:
        return str(self.folder)


class MemberListing:
    """An archive's member names (`a/b.JPEG`) seen as the folders unpacking would make."""

    def __init__(self, names: list[str], where: str):
        self.where = where
        self.folders: dict[str, dict[str, bool]] = {"": {}}
        for name in names:
            parts = name.split("/")
            for depth, part in enumerate(parts):
                folder = "/".join(parts[:depth])
                is_folder = depth < len(parts) - 1
                self.folders.setdefault(folder, {})
                self.folders[folder][part] = self.folders[folder].get(part, False) or is_folder

    def entries(self, rel: str = "") -> list[tuple[str, bool]]:
        """(name, is a folder) for each entry of folder `rel` as unpacking would make it, sorted by name."""
        return sorted(self.folders.get(rel, {}).items())

    def __str__(self) -> str:
        return self.where


@dataclass
class Download:
    """The ILSVRC2012 archives found (any may be None)."""

    train: Path | None = None
    val: Path | None = None
    devkit: Path | None = None


def find_download(paths: list[Path]) -> Download | None:
    """The archives among `paths`: a folder holding them under their download names, or the archive
    files themselves (told apart by what they hold). None for a single folder without them."""
    if len(paths) == 1 and paths[0].is_dir():
        folder = paths[0]
        found = Download(*((folder / name) if (folder / name).is_file() else None
                           for name in (TRAIN_TAR, VAL_TAR, DEVKIT_TAR)))
        return found if (found.train or found.val or found.devkit) else None
    download = Download()
    for path in paths:
        if path.is_dir():
            raise ImgprepError(f"{path} is a folder; give either one folder (an unpacked tree, or the downloaded "
                               "archives) or the archive files")
        kind = archive_kind(path)
        if getattr(download, kind):
            raise ImgprepError(f"two {kind} archives given: {getattr(download, kind)} and {path}")
        setattr(download, kind, path)
    return download


def archive_kind(path: Path) -> str:
    """'train' (a tar of tars), 'val' (a tar of images) or 'devkit' (a compressed tar)."""
    if compression(path):
        return "devkit"
    try:
        with open_user_file(path, "archive") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            first = tar.next()
            while first is not None and not first.isreg():
                first = tar.next()
    except (tarfile.TarError, OSError) as e:
        raise ImgprepError(f"{path} is not a tar archive ({e}); expected {TRAIN_TAR}, {VAL_TAR} or "
                           f"{DEVKIT_TAR}") from None
    if first is None:
        raise ImgprepError(f"{path} holds no files")
    return "train" if first.name.lower().endswith(".tar") else "val"
