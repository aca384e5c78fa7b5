"""An output folder's bookkeeping: the build manifest (`imgprep-build.json`: identity and state),
the failure report's name and the folder's writer lock."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path

from . import ImgprepError

MANIFEST = "imgprep-build.json"
FAILURES = "imgprep-failures.tsv"
LOCK = "imgprep.lock"
MANIFEST_FORMAT = "imgprep-build/1"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(out: Path) -> dict | None:
    try:
        return json.loads((out / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ImgprepError(f"cannot read {out / MANIFEST}: {e}") from None


def write_manifest(out: Path, manifest: dict) -> None:
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out / MANIFEST)


class _OutputLock:
    """An exclusive lock on the output folder, so two builds never write one database."""

    def __init__(self, out: Path):
        self.path = out / LOCK
        self.file = None

    def __enter__(self):
        try:
            self.file = open(self.path, "a+")
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ImgprepError(f"{self.path.parent} is being written by another imgprep process") from None
        except OSError as e:
            raise ImgprepError(f"cannot write to {self.path.parent}: {e.strerror}") from None
        return self

    def __exit__(self, *exc):
        self.file.close()
