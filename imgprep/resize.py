"""`resize`: the image operations tree to tree ("resize in advance, in parallel").

Relative paths are kept. An output newer than its source, made with the same options, is
up to date and skipped, so an interrupted run is resumed by running it again. Outputs are
written to a temporary name and renamed, so none is ever half-written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import ImgprepError
from .build import Failure, crashed_failure, read_source
from .imageops import ImageFailure, ImageSpec, process_image
from .lists import is_image_name
from .parallel import chunked, ordered_map, resolve_jobs
from .progress import Progress

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
    """All image files under src as sorted '/'-separated relative paths, and the count of others."""
    images, others = [], 0
    stack = [""]
    while stack:
        prefix = stack.pop()
        with os.scandir(src / prefix if prefix else src) as it:
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


def resize_chunk(chunk, src: Path, dst: Path, spec: ImageSpec):
    results = []
    for rel in chunk:
        target = dst / rel
        try:
            image = process_image(read_source(src, rel, allow_outside_root=False), spec)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
            tmp.write_bytes(image.data)
            os.replace(tmp, target)
            results.append((rel, None))
        except ImageFailure as e:
            results.append((rel, Failure(0, rel, e.reason, e.detail)))
        except OSError as e:
            raise ImgprepError(f"cannot write {target}: {e.strerror}") from None
    return results


def _is_up_to_date(src: Path, dst: Path, rel: str) -> bool:
    try:
        return os.stat(dst / rel).st_mtime_ns >= os.stat(src / rel).st_mtime_ns
    except FileNotFoundError:
        return False


def resize_tree(src, dst, spec: ImageSpec, jobs: int | None = None, overwrite: bool = False,
                scheduler: str | None = None, show_progress: bool = True) -> ResizeReport:
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ImgprepError(f"source {src} is not a folder")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise ImgprepError("DST must not be SRC or lie inside it")
    spec = ImageSpec(spec.resize, True, spec.quality, spec.gray, spec.max_pixels, spec.draft)
    identity = {"resize": str(spec.resize), "quality": spec.quality, "gray": spec.gray}
    manifest_path = dst / MANIFEST
    try:
        dst.mkdir(parents=True, exist_ok=True)
        if manifest_path.exists() and not overwrite:
            previous = json.loads(manifest_path.read_text())
            if previous != identity:
                raise ImgprepError(f"{dst} was made with {previous}; pass --overwrite to redo it with {identity}")
        manifest_path.write_text(json.dumps(identity))
    except OSError as e:
        raise ImgprepError(f"cannot write to {dst}: {e.strerror}") from None
    images, others = walk_images(src)
    report = ResizeReport(dst, total=len(images), skipped_files=others)
    todo = images if overwrite else [r for r in images if not _is_up_to_date(src, dst, r)]
    report.up_to_date = len(images) - len(todo)
    progress = Progress("resize", len(todo), enabled=show_progress)
    for results in ordered_map(resize_chunk, chunked(todo, 16), resolve_jobs(jobs), scheduler=scheduler,
                               crashed=lambda rel, detail: (rel, crashed_failure(0, rel, detail)),
                               src=src, dst=dst, spec=spec):
        for rel, failure in results:
            if failure:
                report.failures.append(failure)
            else:
                report.written += 1
            progress.update(1, failures=int(failure is not None))
    with open(dst / FAILURES, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.writelines(f"{x.path}\t{x.reason}\t{x.detail}\n" for x in report.failures)
    report.seconds = progress.elapsed
    progress.finish(report.summary())
    return report
