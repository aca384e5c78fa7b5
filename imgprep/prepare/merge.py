"""`merge`: the parts of a sharded build (`--num-shards K --shard-index i`) -> one database equal,
record for record, to a single build. Parts hold contiguous, globally keyed ranges, so merging is
an ordered append. A merge that stopped is finished by the same merge command (it starts over);
its manifest names the parts, and build-lmdb --resume refuses it."""

from __future__ import annotations

import time
from pathlib import Path

from imgprep import ImgprepError
from imgprep.formats.files import read_regular, refuse_overlaps
from imgprep.formats.manifest import (FAILURES, MANIFEST_FORMAT, OutputLock, clear_output, contents, made_by_merge, open_own,
                       read_manifest, refuse_links, require_complete, write_manifest)
from imgprep.prepare.progress import Progress, plural
from imgprep.formats.storage import Reader, open_writer

BATCH = 1000


def _check_parts(parts: list[Path], allow_partial: bool) -> list[tuple[int, Path, dict]]:
    described = []
    for part in parts:
        manifest = read_manifest(part)
        if manifest is None:
            raise ImgprepError(f"{part} has no {MANIFEST_FORMAT} manifest; only imgprep builds can be merged")
        require_complete(part, manifest, allow_partial)
        described.append((manifest["identity"]["shard_index"], part, manifest))
    described.sort(key=lambda t: t[0])
    first = described[0][2]["identity"]
    for _, part, manifest in described[1:]:
        # ROOT may lie at another path on each node; the list, order and options may not differ
        differing = sorted(k for k in set(first) | set(manifest["identity"]) if k not in ("shard_index", "root")
                           and manifest["identity"].get(k) != first.get(k))
        if differing:
            raise ImgprepError(f"{part} was built with other options than {described[0][1]}: {', '.join(differing)}")
    if "order_sha256" not in first:
        raise ImgprepError(f"{described[0][1]} was built by an older imgprep, whose shuffled order is not "
                           "recorded; build the parts again")
    indexes = [i for i, _, _ in described]
    if indexes != list(range(first["num_shards"])):
        raise ImgprepError(f"expected parts 0..{first['num_shards'] - 1} of a {first['num_shards']}-way build, "
                           f"got shard indexes {indexes}")
    return described


def _replaceable(out: Path, overwrite: bool) -> None:
    """An earlier merge into OUT that did not finish is redone without --overwrite; anything else at
    OUT needs --overwrite, which deletes only a database's and imgprep's files (manifest.clear_output)."""
    if not contents(out):
        return
    refuse_links(out)
    if not overwrite:
        manifest = read_manifest(out)
        if manifest is None or not made_by_merge(manifest) or manifest["state"] != "building":
            raise ImgprepError(f"{out} exists; pass --overwrite to replace it")
    clear_output(out)


def merge_parts(parts, out, overwrite: bool = False, show_progress: bool = True, allow_partial: bool = False) -> dict:
    """The parts of one sharded build (`build-lmdb --num-shards K --shard-index i`), copied in order into
    one database at `out`, equal record for record to a single build, with their failure reports joined;
    returns the merged manifest. The parts must be complete (unless `allow_partial`) parts of the same
    build; `out` is replaced only with `overwrite`. A stopped merge is finished by the same call."""
    parts = [Path(p) for p in parts]
    out = Path(out)
    refuse_overlaps(parts, [out], "part")
    described = _check_parts(parts, allow_partial)
    first = described[0][2]["identity"]
    roots = sorted({m["identity"].get("root") for _, _, m in described}, key=str)
    identity = dict(first, num_shards=1, shard_index=0, root=roots[0] if len(roots) == 1 else roots)
    complete = all(m["state"] == "complete" for _, _, m in described)
    if out.exists() and not out.is_dir():
        raise ImgprepError(f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    with OutputLock(out):
        _replaceable(out, overwrite)
        return _merge_locked(described, out, identity, complete, show_progress)


def _merge_locked(described, out: Path, identity: dict, complete: bool, show_progress: bool) -> dict:
    manifest = {"format": MANIFEST_FORMAT, "state": "building", "identity": identity,
                "merged_from": [str(p) for _, p, _ in described], "started": time.time()}
    write_manifest(out, manifest)
    total = sum(m.get("records", 0) for _, _, m in described)
    progress = Progress("merge", total, unit="rec", enabled=show_progress)
    writer = open_writer(out, identity["backend"], resume_hint="run the same merge command again")
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
            failures.append(read_regular(part / FAILURES).decode("utf-8", "surrogateescape"))
            for reason, n in part_manifest.get("failure_reasons", {}).items():
                reasons[reason] = reasons.get(reason, 0) + n
    finally:
        writer.close()
    with open_own(out / FAILURES) as f:
        f.write("".join(failures))
    # merged from incomplete parts (--allow-partial): usable, but never 'complete'
    manifest.update(state="complete" if complete else "partial", finished=time.time(), records=progress.done,
                    failures=sum(reasons.values()), failure_reasons=reasons)
    write_manifest(out, manifest)
    parts = len(described)
    state = "" if complete else " (from incomplete parts: state 'partial')"
    progress.finish(f"merge: {plural(progress.done, 'record')} from {plural(parts, 'part')} in {progress.elapsed:.1f}s -> {out}{state}")
    return manifest
