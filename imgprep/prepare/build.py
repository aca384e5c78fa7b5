"""`build-lmdb`: a list plus an image root -> Caffe Datum records in LMDB or LevelDB.

Images are processed in parallel (local processes or Dask, see parallel.py) in chunks; one
streaming writer puts the records in list order, one transaction per `txn_size` records.
Bookkeeping lives in sidecar files in the database folder, which neither LMDB nor LevelDB reads:

- `imgprep-build.json`: the build's identity (options, resolved ROOT and, for an archive, its size,
  modification time and index sha256, sha256 of the list, the order's algorithm and sha256) and its state
  (`building` until the very end, then `complete`). A folder whose manifest is not `complete` is
  a partial build.
- `imgprep-failures.tsv`: `position<TAB>path<TAB>reason<TAB>detail` for every list entry that
  did not become a record (backslash, tab, LF and CR in the path written as \\\\, \\t, \\n, \\r).

manifest.py reads, validates and writes them, holds OUT's lock and decides what imgprep may
delete there. Resuming needs no other state: keys start with the entry's position in the
(shuffled) list, so the last key in the database says where the last committed transaction ended.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from imgprep import ImgprepError, __version__
from imgprep.formats.codec import datum_parts
from imgprep.formats.imageops import ImageFailure, ImageSpec, process_image
from imgprep.formats.resizing import check_max_aspect, parse_resize
from imgprep.formats.lists import ImageList, read_list
from imgprep.formats.manifest import (FAILURES, MANIFEST_FORMAT, OLD_FORMATS, OutputLock, Failure, read_failures,
                       clear_output, contents, file_sha256, finish_hint, made_by_merge, open_own, read_manifest,
                       refuse_links, write_manifest)
from imgprep.formats.database import entry_key, key_position, record_shape
from imgprep.formats.order import permutation
from imgprep.prepare.presets import PRESETS
from imgprep.prepare.parallel import chunked, ordered_map, resolve_jobs, shared_put
from imgprep.prepare.progress import Progress, plural
from imgprep.prepare.sources import open_source
from imgprep.formats.storage import BACKENDS, INITIAL_MAP_SIZE, RESUME_HINT, Reader, open_writer

ORDER_ALGORITHM = "imgprep.order.permutation/1"  # SplitMix64 scores, sorted (see order.py)
# Shared memory per record in flight: a raw 3x256x256 record is 196 KB; larger ones travel pickled.
AREA_BYTES_PER_RECORD = 320 * 1024
ROOT_PROBES = 1000  # entries looked for in ROOT before a build starts (see check_root)
MAX_CHUNK = 512  # the most entries in one chunk of work (tiny records)




def image_spec(preset: str | None = None, resize: str | None = None, encoded: bool | None = None,
               quality: int = 90, gray: bool = False, max_aspect: float | None = None) -> ImageSpec:
    """The ImageSpec of a preset (caffe: squash 256x256 raw; resnet: shorter 256 JPEG; resnet480:
    shorter 480 JPEG), or of no preset (no resize, JPEG), with the options given overriding it."""
    chosen = dict(PRESETS.get(preset, {}))
    if resize is not None:
        chosen["resize"] = resize
    if encoded is not None:
        chosen["encoded"] = encoded
    spec = ImageSpec(resize=parse_resize(chosen.get("resize", "none")),
                     encoded=chosen.get("encoded", True), quality=quality, gray=gray)
    return spec if max_aspect is None else dataclasses.replace(spec, max_aspect=check_max_aspect(max_aspect))


@dataclass
class BuildOptions:
    """How build-lmdb builds: backend, image operations (`spec`), shuffle and seed, jobs, transaction and
    chunk sizes, shards, a Dask scheduler; `identity()` is what --resume must match."""
    backend: str = "lmdb"
    spec: ImageSpec = field(default_factory=ImageSpec)
    shuffle: bool = False
    seed: int = 0
    check_size: bool = False
    jobs: int | None = None
    txn_size: int = 1000
    chunk_size: int = 32
    max_failures: int | None = None
    num_labels: int | None = None
    allow_outside_root: bool = False
    map_size: int = INITIAL_MAP_SIZE
    num_shards: int = 1
    shard_index: int = 0
    scheduler: str | None = None

    def identity(self) -> dict:
        """The parameters a resumed build must share with the one it continues."""
        spec = self.spec
        return {"backend": self.backend, "resize": str(spec.resize), "encoded": spec.encoded,
                "quality": spec.quality, "gray": spec.gray, "max_pixels": spec.max_pixels,
                "max_aspect": spec.max_aspect,
                "draft": spec.draft, "shuffle": self.shuffle, "seed": self.seed,
                "check_size": self.check_size, "allow_outside_root": self.allow_outside_root,
                "num_shards": self.num_shards, "shard_index": self.shard_index}


@dataclass
class BuildReport:
    """What a build did: records written, failures (by reason), entries in all, what a resume started
    from, seconds, final state."""
    out: Path
    records: int = 0
    failures: int = 0
    total: int = 0
    resumed_from: int = 0
    seconds: float = 0.0
    map_growths: int = 0
    state: str = "complete"
    failure_reasons: dict = field(default_factory=dict)

    def summary(self) -> str:
        """The closing line a build prints: records, failures, rate and state."""
        rate = (self.records + self.failures - self.resumed_from) / self.seconds if self.seconds else 0
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.failure_reasons.items()))
        text = (f"build-lmdb: {self.state}: {plural(self.records, 'record')}, {plural(self.failures, 'failure')} "
                f"of {plural(self.total, 'entry', 'entries')} in {self.seconds:.1f}s ({rate:,.0f} img/s) -> {self.out}")
        if self.resumed_from:
            text += f" (resumed at entry {self.resumed_from:,})"
        if self.failures:
            text += f"; failures by reason: {reasons}; see {self.out / FAILURES}"
        return text


def list_order(count: int, shuffle: bool, seed: int) -> np.ndarray:
    """Entry order for the database: list order, or order.permutation(count, seed), which is the
    same on every machine and numpy version (shards built on different nodes must agree)."""
    if shuffle:
        return permutation(count, seed)
    return np.arange(count)


def order_fingerprint(order: np.ndarray) -> str:
    """sha256 of the whole order (positions as little-endian int64): checked by --resume and merge."""
    return hashlib.sha256(np.ascontiguousarray(order, dtype="<i8").tobytes()).hexdigest()


class Interrupted(ImgprepError):
    """Ctrl-C: the CLI prints the message and exits 130, as for any interrupted command."""

    exit_code = 130


def check_shard(num_shards: int, shard_index: int) -> None:
    """Refuses a shard count below 1 or an index outside 0..count-1."""
    if num_shards < 1:
        raise ImgprepError(f"--num-shards must be at least 1, not {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise ImgprepError(f"--shard-index must be in 0..{num_shards - 1}, not {shard_index}")


def shard_range(count: int, num_shards: int, shard_index: int) -> range:
    """Positions shard `shard_index` of `num_shards` builds: contiguous, so parts append in order."""
    check_shard(num_shards, shard_index)
    return range(count * shard_index // num_shards, count * (shard_index + 1) // num_shards)


def process_chunk(chunk, source, spec: ImageSpec, area=None):
    """Worker side: [(position, path, label)] -> [(position, path, record bytes | Failure, shape)],
    the images read from `source` (sources.open_source: a folder or an archive); with a shared `area`
    (parallel.shared_put) the records travel back through it."""
    results = []
    put = shared_put(area)
    for position, rel, label in chunk:
        try:
            image = process_image(source.read(rel), spec, name=source.describe(rel))
            if image.encoded:  # Caffe's bytes exactly: data, label, encoded (no channels/height/width)
                parts = datum_parts(image.parts, label, 0, 0, 0, True)
            else:
                parts = datum_parts(image.parts, label, image.channels, image.height, image.width, False)
            results.append((position, rel, put(*parts), (image.channels, image.height, image.width)))
        except ImageFailure as e:  # process_image turns every error about one image into one
            results.append((position, rel, Failure(position, rel, e.reason, e.detail), None))
    return results


class ChunkSize:
    """Entries per chunk of work: `smallest` at first, then as many as fill a quarter of a chunk's
    shared area with records of the mean size seen (up to MAX_CHUNK). Each chunk costs the pool a
    round trip (~1-2 ms of CPU): at 32 entries that was 52 µs per record of a tiny JPEG's ~200 µs,
    and 30 µs at 256 (100,000 16x16 JPEGs from a tar, 2 workers); raw 256x256 records stay at 32."""

    def __init__(self, smallest: int, area_bytes: int):
        self.size, self.smallest, self.area_bytes = smallest, smallest, area_bytes
        self.bytes = self.records = 0

    def __call__(self) -> int:
        return self.size

    def saw(self, values: list) -> None:
        """Counts a chunk's record values into the mean record size."""
        self.records += len(values)
        self.bytes += sum(map(len, values))
        if self.records:
            fitting = self.area_bytes * self.records // (4 * max(1, self.bytes))
            self.size = max(self.smallest, min(MAX_CHUNK, fitting))


def crashed_failure(position: int, rel: str, detail: str) -> Failure:
    """An image whose worker process died under it twice (parallel.ordered_map's `crashed`)."""
    return Failure(position, rel, "crashed", f"{detail}, twice, while processing it")


def crashed_entry(item, detail: str):
    """The result that stands for an entry whose worker died on it twice: a `crashed` failure."""
    position, rel, _ = item
    return position, rel, crashed_failure(position, rel, detail), None


def _prepare_output(out: Path, identity: dict, resume: bool, overwrite: bool) -> dict | None:
    """Checks what is at OUT, holding its lock; returns the manifest of a build to resume, or None to
    start fresh. --overwrite deletes only a database's files and imgprep's own (clear_output)."""
    if not contents(out):
        return None
    refuse_links(out)
    if overwrite:
        clear_output(out)
        return None
    manifest = read_manifest(out)
    if manifest is None:
        raise ImgprepError(f"{out} exists and was not built by imgprep; choose another OUT (--overwrite "
                           "replaces only a database there)")
    if made_by_merge(manifest) and (resume or manifest["state"] != "complete"):
        # its identity is a single build's, but only merge knows how far it got and which failures it copied
        state = "complete" if manifest["state"] == "complete" else f"incomplete (state {manifest['state']!r})"
        hint = "" if manifest["state"] == "complete" else f"; {finish_hint(manifest)}"
        raise ImgprepError(f"{out} is the output of `imgprep merge`, {state}; build-lmdb --resume continues only "
                           f"its own builds{hint}, or pass --overwrite to build it from the list instead")
    if manifest["state"] == "complete" and not resume:
        raise ImgprepError(f"{out} is a complete database; pass --overwrite to build it again")
    if not resume:
        raise ImgprepError(f"{out} holds a partial build (state {manifest['state']!r}); "
                           "pass --resume to continue it or --overwrite to start again")
    if manifest["format"] in OLD_FORMATS or manifest["state"] == "partial":
        why = ("it was made by an older imgprep, whose shuffled order and build identity differ"
               if manifest["format"] in OLD_FORMATS else "it was merged from incomplete parts")
        raise ImgprepError(f"cannot resume {out}: {why}; start again with --overwrite")
    old = manifest["identity"]
    differing = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
    if differing:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {identity.get(k)!r}" for k in differing)
        raise ImgprepError(f"cannot resume {out}: the list, ROOT or options differ from the partial build "
                           f"({details})")
    return manifest


def _read_entries(list_path: Path, options: BuildOptions) -> tuple[ImageList, str]:
    """The list's entries and the sha256 of exactly the bytes they were parsed from. A pipe cannot be
    read a second time, so a resumed build could not check it was given the same list: refused."""
    try:
        before = os.stat(list_path)
    except OSError as e:
        raise ImgprepError(f"cannot read list {list_path}: {e.strerror}") from None
    if not stat.S_ISREG(before.st_mode):
        raise ImgprepError(f"list {list_path} is not a regular file (a pipe?); a build must be able to check "
                           "the list again when resumed: save it to a file first (cmd > list.txt)")
    digest = file_sha256(list_path)
    entries = read_list(list_path, num_labels=options.num_labels, allow_outside_root=options.allow_outside_root)
    after = os.stat(list_path)
    if (after.st_size, after.st_mtime_ns, after.st_ino) != (before.st_size, before.st_mtime_ns, before.st_ino):
        raise ImgprepError(f"list {list_path} changed while it was read; run the command again")
    return entries, digest


def check_root(source, root, entries: ImageList, order: np.ndarray, positions: range) -> None:
    """A wrong ROOT makes every entry a 'missing' failure, found only after a whole pass (1.28
    million of them for ImageNet): refused when none of up to ROOT_PROBES entries spread evenly over
    the entries to build is in ROOT. It stops at the first entry found, so a right ROOT costs one read."""
    if not len(positions):
        return
    count = min(ROOT_PROBES, len(positions))
    probes = sorted({int(p) for p in np.linspace(positions.start, positions.stop - 1, count).round()})
    for position in probes:
        try:
            source.read(entries.paths[order[position]])
            return
        except ImageFailure as e:
            if e.reason != "missing":  # something is there (a link leaving ROOT, a FIFO, a bad image)
                return
    tried = source.describe(entries.paths[order[probes[0]]])
    raise ImgprepError(f"none of the {len(probes):,} list entries looked for is in ROOT {root} ({tried} does not "
                       "exist, for one); is ROOT the folder the list's paths are relative to? Pass --keep-going "
                       "to build anyway (every missing entry becomes a failure)")


def build_database(list_path, root, out, options: BuildOptions = BuildOptions(),
                   resume: bool = False, overwrite: bool = False, show_progress: bool = True,
                   image_list: ImageList | None = None, allow_empty: bool = False,
                   keep_going: bool = False, resume_hint: str = RESUME_HINT) -> BuildReport:
    """Builds (or resumes) OUT from LIST and ROOT (a folder, or an uncompressed tar: see
    archives.py). Raises ImgprepError on anything fatal; nothing at OUT is created or changed before
    the arguments, ROOT and the list have been checked. A ROOT that holds none of the entries looked
    for (check_root) is refused unless `keep_going`. A full disk's error ends with `resume_hint`
    (a caller that continues builds its own way says how)."""
    list_path, root, out = Path(list_path), Path(root), Path(out)
    if options.backend not in BACKENDS:
        raise ImgprepError(f"unknown backend {options.backend!r}; choose one of {', '.join(BACKENDS)}")
    check_shard(options.num_shards, options.shard_index)
    source = open_source(root, options.allow_outside_root, show_progress)
    if image_list is not None:
        entries, list_digest = image_list, file_sha256(list_path)
    else:
        entries, list_digest = _read_entries(list_path, options)
    if not len(entries) and not allow_empty:
        raise ImgprepError(f"list {list_path} holds no entries; pass --allow-empty to build an empty database")
    order = list_order(len(entries), options.shuffle, options.seed)
    if not keep_going:
        check_root(source, root, entries, order, shard_range(len(entries), options.num_shards, options.shard_index))
    identity = dict(options.identity(), list_sha256=list_digest, entries=len(entries), **source.identity(),
                    order=ORDER_ALGORITHM if options.shuffle else "list", order_sha256=order_fingerprint(order))
    if out.exists() and not out.is_dir():
        raise ImgprepError(f"{out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ImgprepError(f"cannot create {out}: {e.strerror}") from None
    with OutputLock(out):
        previous = _prepare_output(out, identity, resume, overwrite)
        return _build_locked(list_path, root, source, out, options, entries, order, identity, previous,
                             show_progress, resume_hint)


def _build_locked(list_path, root, source, out, options, entries, order, identity, previous, show_progress,
                  resume_hint):
    positions = shard_range(len(entries), options.num_shards, options.shard_index)
    start = positions.start
    failures: list[Failure] = []
    first_shape = None
    if previous is not None:
        with Reader(out, options.backend) as reader:
            last = reader.last_key()
            if last is not None:
                start = key_position(last) + 1
                first_shape = record_shape(next(reader.items())[1]) if options.check_size else None
        failures = [f for f in read_failures(out) if f.position < start]
    manifest = {"format": MANIFEST_FORMAT, "state": "building", "identity": identity,
                "list": str(list_path), "root": str(root), "imgprep": __version__,
                "started": previous.get("started") if previous else time.time()}
    write_manifest(out, manifest)
    with open_own(out / FAILURES) as f:
        f.writelines(x.line() for x in failures)
        f.flush()
        os.fsync(f.fileno())  # on disk before any record this build commits

    report = BuildReport(out, total=len(positions), resumed_from=start - positions.start)
    report.records = start - positions.start - len(failures)
    progress = Progress("build-lmdb", len(positions), enabled=show_progress, done=report.resumed_from,
                        failures=len(failures))
    failure_log = open_own(out / FAILURES, append=True)
    pending_failures: list[Failure] = []

    def log_failures():  # before every commit: a failure is on disk before any record after it
        if pending_failures:
            failure_log.writelines(x.line() for x in pending_failures)
            failure_log.flush()
            os.fsync(failure_log.fileno())
            failures.extend(pending_failures)
            pending_failures.clear()

    writer = open_writer(out, options.backend, options.map_size, before_commit=log_failures,
                         resume_hint=resume_hint)
    uncommitted = 0

    def commit():
        nonlocal uncommitted
        writer.commit()
        log_failures()  # when nothing was added since the last commit, the writer had none to make
        uncommitted = 0

    work = ((int(p), entries.paths[order[p]], int(entries.labels[order[p]]))
            for p in range(start, positions.stop))
    jobs = resolve_jobs(options.jobs)
    area_bytes = options.chunk_size * AREA_BYTES_PER_RECORD
    chunk_size = ChunkSize(options.chunk_size, area_bytes)
    try:
        # Records come back as views of the workers' shared memory, valid until the next chunk's
        # results are asked for: each chunk's records go into the open transaction at once.
        for results in ordered_map(process_chunk, chunked(work, chunk_size), jobs, scheduler=options.scheduler,
                                   area_bytes=area_bytes, crashed=crashed_entry, lend=True, source=source,
                                   spec=options.spec):
            chunk_size.saw([value for _, _, value, _ in results if not isinstance(value, Failure)])
            records = []
            for position, rel, value, shape in results:
                if not isinstance(value, Failure) and options.check_size:
                    first_shape = first_shape or shape
                    if shape != first_shape:
                        value = Failure(position, rel, "size-mismatch",
                                        f"{shape[1]}x{shape[2]}x{shape[0]} differs from the first "
                                        f"record's {first_shape[1]}x{first_shape[2]}x{first_shape[0]}")
                if isinstance(value, Failure):
                    pending_failures.append(value)
                    progress.update(1, failures=1)
                    if options.max_failures is not None and len(failures) + len(pending_failures) > options.max_failures:
                        writer.add(records)
                        commit()
                        manifest["state"] = "failed"
                        write_manifest(out, manifest)
                        raise ImgprepError(
                            f"more than --max-failures={options.max_failures} images failed; stopped after "
                            f"entry {position:,} (last: {rel}: {value.reason}: {value.detail}); see {out / FAILURES}")
                else:
                    records.append((entry_key(position, rel), value))
                    report.records += 1
                    progress.update(1)
                    if uncommitted + len(records) >= options.txn_size:
                        writer.add(records)
                        records = []
                        commit()
            writer.add(records)
            uncommitted += len(records)
        commit()
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; {out} keeps every committed record. Run the same command "
                           "with --resume to continue.") from None
    finally:
        failure_log.close()
        report.map_growths = getattr(writer, "map_growths", 0)
        writer.close()
    report.failures = len(failures)
    report.failure_reasons = _count_reasons(failures)
    report.seconds = progress.elapsed
    manifest.update(state="complete", finished=time.time(), records=report.records,
                    failures=report.failures, failure_reasons=report.failure_reasons,
                    first_position=positions.start, end_position=positions.stop)
    write_manifest(out, manifest)
    progress.finish(report.summary())
    return report


def _count_reasons(failures: list[Failure]) -> dict:
    counts: dict[str, int] = {}
    for f in failures:
        counts[f.reason] = counts.get(f.reason, 0) + 1
    return counts


def report_to_dict(report: BuildReport) -> dict:
    """A BuildReport as the JSON the manifest and --json print."""
    data = asdict(report)
    data["out"] = str(report.out)
    return data
