"""`resize`: the image operations tree to tree ("resize in advance, in parallel"); the source may
also be an uncompressed tar (nested tars included), whose members land where unpacking would put them.

Relative paths are kept. An output newer than its source, made with the same options, is
up to date and skipped, so an interrupted run is resumed by running it again. Outputs are
written to a temporary name and renamed (files.write_atomic), so none is ever half-written.
Nothing is written through a symbolic link inside DST: an output whose folder or file is a link is
a failure. DST may not be SRC, lie inside it or hold it (compared by identity: files.refuse_overlaps),
and a SRC without images is an error, not an empty success.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from imgprep import ImgprepError
from imgprep.prepare.build import crashed_failure
from imgprep.formats.manifest import Failure
from imgprep.formats.files import read_regular, refuse_overlaps, write_atomic
from imgprep.formats.imageops import ImageFailure, ImageSpec, process_image
from imgprep.formats.lists import is_image_name
from imgprep.prepare.parallel import chunked, ordered_map, resolve_jobs
from imgprep.prepare.progress import Progress, plural
from imgprep.prepare.sources import TreeSource, open_source

MANIFEST = "imgprep-resize.json"
FAILURES = "imgprep-resize-failures.tsv"


@dataclass
class ResizeReport:
    """What `resize_tree` did: images found, written, skipped as up to date, and failed."""

    dst: Path
    total: int = 0
    written: int = 0
    up_to_date: int = 0
    failures: list = field(default_factory=list)
    skipped_files: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        """The closing line: counts, rate and, with failures, their reasons and the report's path."""
        if self.written == 0 and not self.failures:
            return (f"resize: nothing to do: {plural(self.up_to_date, 'output')} up to date in {self.dst} "
                    "(--overwrite redoes them)")
        rate = (self.written + len(self.failures)) / self.seconds if self.seconds else 0
        text = (f"resize: {self.written:,} written, {self.up_to_date:,} up to date, "
                f"{plural(len(self.failures), 'failure')} of {plural(self.total, 'image')} in {self.seconds:.1f}s "
                f"({rate:,.0f} img/s) -> {self.dst}")
        if self.failures:
            reasons = Counter(f.reason for f in self.failures)
            text += (f"; failures by reason: {', '.join(f'{k} {v}' for k, v in sorted(reasons.items()))}; "
                     f"see {self.dst / FAILURES}")
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


def resize_chunk(chunk, source, dst: Path, spec: ImageSpec):
    """One worker's task: resizes the images `chunk` names; returns (rel, None) for each one written
    and (rel, Failure) for each one that could not be used."""
    results = []
    made: set = set()
    for rel in chunk:
        target = dst / rel
        try:
            image = process_image(source.read(rel), spec, name=source.describe(rel))
            write_atomic(output_path(dst, rel, made), image.data, sync=False)  # one fsync per image would halve the rate
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
    """Resizes every image under `src` (a folder, or an uncompressed tar: see archives.py) into `dst` as
    JPEG files as `spec` says, `jobs` processes (or the Dask cluster at `scheduler`) at a time. Up-to-date
    outputs are skipped unless `overwrite`; a `dst` made with other options is refused unless `overwrite`.
    Unusable images are listed in DST/imgprep-resize-failures.tsv and in the report."""
    src, dst = Path(src), Path(dst)
    refuse_overlaps([src], [dst], "source")
    source = open_source(src, show_progress=show_progress)
    spec = dataclasses.replace(spec, encoded=True)
    identity = {"resize": str(spec.resize), "quality": spec.quality, "gray": spec.gray,
                "max_aspect": spec.max_aspect}
    manifest_path = dst / MANIFEST
    try:
        previous = None if overwrite else json.loads(read_regular(manifest_path))
    except FileNotFoundError:
        previous = None
    except ValueError:
        raise ImgprepError(f"{manifest_path} is not resize's JSON record; remove it or choose another DST") from None
    except OSError as e:
        raise ImgprepError(f"cannot read {manifest_path}: {e.strerror or e}") from None
    if previous is not None and previous != identity:
        raise ImgprepError(f"{dst} was made with {previous}; pass --overwrite to redo it with {identity}")
    if isinstance(source, TreeSource):
        images, others = walk_images(src)
    else:
        members = source.members()
        images = [rel for rel in members if is_image_name(rel)]
        others = len(members) - len(images)
    if not images:
        raise ImgprepError(f"SRC {src} holds no images ({plural(others, 'other file')}); "
                           "nothing to resize. Is it the folder (or tar) of the images?")
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ImgprepError(f"cannot write to {dst}: {e.strerror or e}") from None
    write_atomic(manifest_path, json.dumps(identity).encode())
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
    write_atomic(dst / FAILURES, lines.encode("utf-8", "surrogateescape"))
    report.seconds = progress.elapsed
    progress.finish(report.summary())
    return report
