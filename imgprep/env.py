"""What `imgprep doctor` reports: the PIL build, DALI, devices, database libraries, and imgprep's
cache (the archive indexes in $XDG_CACHE_HOME/imgprep), whose entries of archives that are gone
`imgprep doctor --clean-cache` removes."""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from imgprep import __version__
from imgprep.prepare.archives import cache_dir
from imgprep.prepare.progress import format_bytes, plural


PILLOW_SIMD = "pillow-simd"
PLAIN_PILLOW = "plain Pillow"


def pil_kind(pil_version: str, simd_version: str | None) -> str:
    """Which build provides `PIL`: pillow-simd only if its distribution is installed and is the one
    imported (both install the same `PIL` package; the one installed last wins)."""
    return PILLOW_SIMD if simd_version is not None and simd_version == pil_version else PLAIN_PILLOW


def pil_fix_command(python: str) -> str:
    """The pip commands that put pillow-simd back in place of plain Pillow (what
    scripts/ensure-pillow-simd.sh does)."""
    return (f"{python} -m pip uninstall -y pillow pillow-simd && "
            f"{python} -m pip install --no-deps --force-reinstall pillow-simd")


def pil_report(pil_version: str, simd_version: str | None, jpeg: str, python: str) -> dict[str, str]:
    """doctor's PIL lines: the build, and for plain Pillow what it costs and the command that fixes it."""
    if pil_kind(pil_version, simd_version) == PILLOW_SIMD:
        return {"PIL": f"{pil_version} (pillow-simd; JPEG: {jpeg})"}
    return {
        "PIL": f"{pil_version} (plain Pillow, NOT pillow-simd: resizing is about 4x slower, decoding "
               f"and resizing together about 1.4x; JPEG: {jpeg})",
        "fix": pil_fix_command(python),
    }


def _jpeg_library() -> str:
    from PIL import features

    turbo = features.version_feature("libjpeg_turbo") if features.check_feature("libjpeg_turbo") else None
    return f"libjpeg-turbo {turbo}" if turbo else f"libjpeg {features.version_codec('jpg')}"


def pil_build() -> dict[str, str]:
    """Which Pillow is imported (pillow-simd or plain Pillow), its JPEG library and, for plain Pillow, the
    command that installs pillow-simd."""
    import PIL

    try:
        simd_version = metadata.version("pillow-simd")
    except metadata.PackageNotFoundError:
        simd_version = None
    return pil_report(PIL.__version__, simd_version, _jpeg_library(), sys.executable)


def dali_version() -> str:
    """The installed DALI's version, or 'not installed'."""
    try:
        import nvidia.dali

        return nvidia.dali.__version__
    except ImportError:
        return "not installed"


def describe() -> dict[str, str]:
    """What `imgprep doctor` prints: name -> value for imgprep, Python, Pillow, numpy, the backends, DALI and
    the devices."""
    import lmdb
    import numpy
    import plyvel

    from imgprep.loading.loader import gpu_count

    gpus = gpu_count()
    info = {
        "imgprep": __version__,
        "python": platform.python_version(),
        **pil_build(),
        "numpy": numpy.__version__,
        "DALI": dali_version(),
        "devices": f"{plural(gpus, 'CUDA GPU')}" if gpus else "no GPU: loader runs in DALI's CPU mode",
        "lmdb": f"py-lmdb {lmdb.__version__}, LMDB {'.'.join(map(str, lmdb.version()))}",
        "leveldb": f"plyvel {plyvel.__version__}, LevelDB {plyvel.__leveldb_version__}",
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = "not installed (optional: pip install 'imgprep[torch]')"
    info["cache"] = cache_report(cache_entries())[0]
    return info


# ---------------------------------------------------------------------------------------------
# The cache: archive indexes (archives.py), one file per archive, made again whenever needed

IN_USE, GONE, UNREADABLE, LEFT_OVER, BEING_WRITTEN = (
    "in use", "archive gone", "unreadable", "left by a stopped run", "being written")
REMOVABLE = (GONE, LEFT_OVER)
HEADER_BYTES = 1 << 16
TEMPORARY = re.compile(r"^\..*\.tmp(\d+)$")  # an index being written: .<name>.tmp<pid>


@dataclass
class CacheEntry:
    """One file of imgprep's cache: its path, size, state and the archive it indexes."""
    path: Path
    size: int
    state: str  # IN_USE, GONE, UNREADABLE, LEFT_OVER or BEING_WRITTEN
    archive: str | None = None  # the archive's path, as the entry records it


def _recorded_archive(path: Path) -> str | None:
    """The archive path an index file records in its header (a JSON line with "archive" among its
    first lines), or None when the file does not read so."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except OSError:
        return None
    for line in head.split(b"\n")[:4]:
        try:
            header = json.loads(line)
        except ValueError:
            continue
        if isinstance(header, dict) and isinstance(header.get("archive"), str):
            return header["archive"]
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cache_entries(folder: Path | None = None) -> list[CacheEntry]:
    """Every file in imgprep's cache folder (default `archives.cache_dir()`), with what it is."""
    folder = Path(folder) if folder else cache_dir()
    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        size = path.stat().st_size
        temporary = TEMPORARY.match(path.name)
        if temporary:
            state = BEING_WRITTEN if _alive(int(temporary[1])) else LEFT_OVER
            entries.append(CacheEntry(path, size, state))
            continue
        archive = _recorded_archive(path)
        if archive is None:
            entries.append(CacheEntry(path, size, UNREADABLE))
        else:
            entries.append(CacheEntry(path, size, IN_USE if os.path.exists(archive) else GONE, archive))
    return entries


def cache_report(entries: list[CacheEntry], folder: Path | None = None) -> tuple[str, list[str]]:
    """doctor's cache line (folder, count, size, what can go) and one line per entry that is not in use."""
    folder = folder or cache_dir()
    total = sum(e.size for e in entries)
    text = f"{folder}: {plural(len(entries), 'file')}, {format_bytes(total)}"
    removable = [e for e in entries if e.state in REMOVABLE]
    if removable:
        text += (f"; {len(removable)} ({format_bytes(sum(e.size for e in removable))}) of archives that are gone or "
                 "left by stopped runs: imgprep doctor --clean-cache removes them")
    return text, [_entry_line(e) for e in entries if e.state != IN_USE]


def _entry_line(entry: CacheEntry) -> str:
    what = {GONE: f"indexes {entry.archive}, which is gone", IN_USE: f"indexes {entry.archive}",
            UNREADABLE: "not an archive index this imgprep reads (kept; delete it by hand if unwanted)",
            LEFT_OVER: "an index left half-written by a stopped run", BEING_WRITTEN: "an index being written"}
    return f"{entry.path} ({format_bytes(entry.size)}): {what[entry.state]}"


def clean_cache(entries: list[CacheEntry]) -> list[str]:
    """Removes the entries of archives that are gone (a drive not mounted now counts as gone: its
    archives are indexed again on next use) and those left by stopped runs; one line per entry."""
    lines = []
    for entry in entries:
        if entry.state in REMOVABLE:
            try:
                entry.path.unlink()
                lines.append(f"removed {_entry_line(entry)}")
            except FileNotFoundError:
                pass
            except OSError as e:
                lines.append(f"could not remove {entry.path}: {e.strerror}")
        else:
            lines.append(f"kept {_entry_line(entry)}")
    removed = [e for e in entries if e.state in REMOVABLE]
    kept = [e for e in entries if e.state not in REMOVABLE]
    lines.append(f"cache: removed {plural(len(removed), 'file')}, {format_bytes(sum(e.size for e in removed))}; "
                 f"{plural(len(kept), 'file')}, {format_bytes(sum(e.size for e in kept))} kept")
    return lines
