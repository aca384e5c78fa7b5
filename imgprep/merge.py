"""`merge`: the parts of a sharded build (`--num-shards K --shard-index i`) -> one database equal,
record for record, to a single build. Parts hold contiguous, globally keyed ranges, so merging is
an ordered append."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from . import ImgprepError
from .build import FAILURES, MANIFEST_FORMAT, read_manifest, write_manifest
from .progress import Progress
from .storage import Reader, open_writer

BATCH = 1000


def _check_parts(parts: list[Path]) -> list[tuple[int, Path, dict]]:
    described = []
    for part in parts:
        manifest = read_manifest(part)
        if manifest is None:
            raise ImgprepError(f"{part} has no {MANIFEST_FORMAT} manifest; only imgprep builds can be merged")
        if manifest.get("state") != "complete":
            raise ImgprepError(f"{part} is not complete (state {manifest.get('state')!r}); finish it with --resume")
        described.append((manifest["identity"]["shard_index"], part, manifest))
    described.sort(key=lambda t: t[0])
    first = described[0][2]["identity"]
    for _, part, manifest in described[1:]:
        differing = sorted(k for k in first if k != "shard_index" and manifest["identity"].get(k) != first[k])
        if differing:
            raise ImgprepError(f"{part} was built with other options than {described[0][1]}: {', '.join(differing)}")
    indexes = [i for i, _, _ in described]
    if indexes != list(range(first["num_shards"])):
        raise ImgprepError(f"expected parts 0..{first['num_shards'] - 1} of a {first['num_shards']}-way build, "
                           f"got shard indexes {indexes}")
    return described


def merge_parts(parts, out, overwrite: bool = False, show_progress: bool = True) -> dict:
    parts = [Path(p) for p in parts]
    out = Path(out)
    described = _check_parts(parts)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ImgprepError(f"{out} exists; pass --overwrite to replace it")
        if read_manifest(out) is None:
            raise ImgprepError(f"{out} exists and was not built by imgprep; refusing to delete it")
        shutil.rmtree(out)
    identity = dict(described[0][2]["identity"], num_shards=1, shard_index=0)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"format": MANIFEST_FORMAT, "state": "building", "identity": identity,
                "merged_from": [str(p) for _, p, _ in described], "started": time.time()}
    write_manifest(out, manifest)
    total = sum(m.get("records", 0) for _, _, m in described)
    progress = Progress("merge", total, unit="rec", enabled=show_progress)
    writer = open_writer(out, identity["backend"])
    failures, reasons = [], {}
    try:
        for _, part, part_manifest in described:
            with Reader(part, identity["backend"]) as reader:
                batch = []
                for item in reader.items():
                    batch.append(item)
                    if len(batch) == BATCH:
                        writer.put_batch(batch)
                        progress.update(len(batch))
                        batch = []
                if batch:
                    writer.put_batch(batch)
                    progress.update(len(batch))
            failures.append((part / FAILURES).read_text(encoding="utf-8", errors="surrogateescape"))
            for reason, n in part_manifest.get("failure_reasons", {}).items():
                reasons[reason] = reasons.get(reason, 0) + n
    finally:
        writer.close()
    (out / FAILURES).write_text("".join(failures), encoding="utf-8", errors="surrogateescape")
    manifest.update(state="complete", finished=time.time(), records=progress.done,
                    failures=sum(reasons.values()), failure_reasons=reasons)
    write_manifest(out, manifest)
    progress.finish(f"merge: {progress.done:,} records from {len(parts)} parts in {progress.elapsed:.1f}s -> {out}")
    return manifest
