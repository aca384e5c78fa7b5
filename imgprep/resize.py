"""`resize`: the image operations tree to tree ("resize in advance, in parallel"); the source may
also be an uncompressed tar (nested tars included), whose members land where unpacking would put them.

Relative paths are kept. An output newer than its source, made with the same options, is
up to date and skipped, so an interrupted run is resumed by running it again. Outputs are
written to a temporary name and renamed, so none is ever half-written. Nothing is written
through a symbolic link inside DST: an output whose folder or file is a link is a failure.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from . import ImgprepError
from .build import Failure, crashed_failure
from .imageops import ImageFailure, ImageSpec, process_image
from .lists import is_image_name
from .parallel import chunked, ordered_map, resolve_jobs
from .progress import Progress
from .sources import TreeSource, open_source

MANIFEST = "imgprep-resize.json"
FAILURES = "imgprep-resize-failures.tsv"


@dataclass
class ResizeReport:
    dst: Path
    total: int = 0
    written: int = 0
    up_to_date: int = 0
    failures: list = field(default_factory=list)
    skipped_files: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        rate = self.written / self.seconds if self.seconds else 0
        text = (f"resize: {self.written:,} written, {self.up_to_date:,} up to date, "
                f"{len(self.failures):,} failures of {self.total:,} images in {self.seconds:.1f}s "
                f"({rate:,.0f} img/s) -> {self.dst}")
        if self.failures:
            text += f"; see {self.dst / FAILURES}"
        return text


def walk_images(src: Path) -> tuple[list[str], int]:
    """All image files under src as sorted '/'-separated relative paths, and the count of others.
    A folder reached twice (a symlink loop) is walked once."""
    images, others = [], 0
    stack = [""]
    seen = set()
    while stack:
        prefix = stack.pop()
        folder = src / prefix if prefix else src
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(folder) as it:
            for entry in it:
                rel = f"{prefix}{entry.name}"
                if entry.is_dir():
                    stack.append(rel + "/")
                elif is_image_name(entry.name):
                    images.append(rel)
                else:
                    others += 1
    images.sort()
    return images, others


def output_path(dst: Path, rel: str, made: set) -> Path:
    """Where output `rel` goes, its folders made where missing. A link (or file) on the way, or
    a link at the output itself, is a failure: no output ever lands outside DST. `made`
    remembers the folders already checked."""
    parts = rel.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ImageFailure("unsafe-output", f"{rel!r} is not a plain relative path; resize writes only inside DST")
    folder = dst
    for part in parts[:-1]:
        folder = folder / part
        if folder in made:
            continue
        try:
            os.mkdir(folder)
        except FileExistsError:
            pass
        mode = os.lstat(folder).st_mode
        if not stat.S_ISDIR(mode):
            kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a folder"
            raise ImageFailure("unsafe-output", f"{folder} is {kind}; resize writes only into real folders")
        made.add(folder)
    target = folder / rel.rsplit("/", 1)[-1]
    if os.path.islink(target):
        raise ImageFailure("unsafe-output", f"{target} is a symbolic link; resize neither follows nor replaces it")
    return target


def write_output(target: Path, data: bytes) -> None:
    """Writes `target` through a temporary file and a rename, which replaces a link at `target`
    rather than writing through it."""
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    try:
        fd = os.open(tmp, flags, 0o644)
    except FileExistsError:  # left by a killed run of a process with the same id
        os.unlink(tmp)
        fd = os.open(tmp, flags, 0o644)
    with open(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, target)


def resize_chunk(chunk, source, dst: Path, spec: ImageSpec):
    results = []
    made: set = set()
    for rel in chunk:
        target = dst / rel
        try:
            image = process_image(source.read(rel), spec, name=source.describe(rel))
            write_output(output_path(dst, rel, made), image.data)
            results.append((rel, None))
        except ImageFailure as e:
            results.append((rel, Failure(0, rel, e.reason, e.detail)))
        except OSError as e:
            raise ImgprepError(f"cannot write {target}: {e.strerror or e}") from None
    return results


def _is_up_to_date(source, dst: Path, rel: str) -> bool:
    """A link in place of the output is never up to date: it is reported, not taken for an output.
    An archive's members count as changed when the archive is."""
    try:
        output = os.stat(dst / rel, follow_symlinks=False)
        return not stat.S_ISLNK(output.st_mode) and output.st_mtime_ns >= source.mtime_ns(rel)
    except FileNotFoundError:
        return False


def resize_tree(src, dst, spec: ImageSpec, jobs: int | None = None, overwrite: bool = False,
                scheduler: str | None = None, show_progress: bool = True) -> ResizeReport:
    """Resizes every image under SRC (a folder, or an uncompressed tar: see archives.py) into DST."""
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise ImgprepError("DST must not be SRC or lie inside it")
    source = open_source(src, show_progress=show_progress)
    spec = dataclasses.replace(spec, encoded=True)
    identity = {"resize": str(spec.resize), "quality": spec.quality, "gray": spec.gray,
                "max_aspect": spec.max_aspect}
    manifest_path = dst / MANIFEST
    try:
        dst.mkdir(parents=True, exist_ok=True)
        if manifest_path.exists() and not overwrite:
            try:
                previous = json.loads(manifest_path.read_text())
            except ValueError:
                raise ImgprepError(f"{manifest_path} is not resize's JSON record; remove it or choose "
                                   "another DST") from None
            if previous != identity:
                raise ImgprepError(f"{dst} was made with {previous}; pass --overwrite to redo it with {identity}")
        write_output(manifest_path, json.dumps(identity).encode())
    except OSError as e:
        raise ImgprepError(f"cannot write to {dst}: {e.strerror or e}") from None
    if isinstance(source, TreeSource):
        images, others = walk_images(src)
    else:
        members = source.members()
        images = [rel for rel in members if is_image_name(rel)]
        others = len(members) - len(images)
    report = ResizeReport(dst, total=len(images), skipped_files=others)
    todo = images if overwrite else [r for r in images if not _is_up_to_date(source, dst, r)]
    report.up_to_date = len(images) - len(todo)
    progress = Progress("resize", len(todo), enabled=show_progress)
    for results in ordered_map(resize_chunk, chunked(todo, 16), resolve_jobs(jobs), scheduler=scheduler,
                               crashed=lambda rel, detail: (rel, crashed_failure(0, rel, detail)),
                               source=source, dst=dst, spec=spec):
        for rel, failure in results:
            if failure:
                report.failures.append(failure)
            else:
                report.written += 1
            progress.update(1, failures=int(failure is not None))
    lines = "".join(x.line().split("\t", 1)[1] for x in report.failures)  # path, reason, detail
    try:
        write_output(dst / FAILURES, lines.encode("utf-8", "surrogateescape"))
    except OSError as e:
        raise ImgprepError(f"cannot write {dst / FAILURES}: {e.strerror or e}") from None
    report.seconds = progress.elapsed
    progress.finish(report.summary())
    return report
