"""`inspect`: what a database holds, whether every record decodes, and whether it matches a list."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from imgprep import ImgprepError
import numpy as np

from imgprep.prepare.build import list_order
from imgprep.formats.manifest import FAILURES, read_failures
from imgprep.formats.database import datum_shape, entry_key
from imgprep.formats.codec import RecordError, decode_datum
from imgprep.formats.imageops import ImageFailure, decode_upright
from imgprep.formats.lists import read_list
from imgprep.formats.files import require_regular
from imgprep.formats.manifest import finish_hint, read_manifest, record_count, require_complete
from imgprep.prepare.progress import Progress, plural
from imgprep.formats.storage import Reader

SHOWN = 5  # examples shown of each kind of problem


def _count(n, noun: str) -> str:
    """A manifest's count with its noun ('? records' where the manifest does not say)."""
    return plural(n, noun) if isinstance(n, int) else f"? {noun}s"


@dataclass
class Inspection:
    """What `inspect_db` found: the database's counts and histograms, its manifest, and every problem by kind
    (undecodable, missing, extra, mislabeled, misplaced records)."""
    path: Path
    backend: str = ""
    records: int = 0
    kinds: Counter = field(default_factory=Counter)  # "raw" / "encoded"
    sizes: Counter = field(default_factory=Counter)  # "WxHxC"
    labels: Counter = field(default_factory=Counter)
    first_keys: list = field(default_factory=list)
    manifest: dict | None = None
    bad_records: list = field(default_factory=list)  # (key, reason)
    missing: list = field(default_factory=list)  # (path, why)
    reported: list = field(default_factory=list)  # (path, reason): failed at build, in the failure report
    extra: list = field(default_factory=list)
    mislabeled: list = field(default_factory=list)  # (key, stored, listed)
    misplaced: list = field(default_factory=list)  # (key, expected key)
    listed: int | None = None  # entries of the list checked against, when one was given
    verified: bool = False  # every record decoded (encoded images too)

    @property
    def ok(self) -> bool:
        """No record is undecodable, missing, extra, mislabeled or under the wrong key (failures the build
        reported do not count)."""
        return not (self.bad_records or self.missing or self.extra or self.mislabeled or self.misplaced)

    def lines(self) -> list[str]:
        """The report `imgprep inspect` prints, one line each."""
        out = [f"database: {self.path} ({self.backend})", f"records: {self.records:,}",
               "kinds: " + ", ".join(f"{k} {v:,}" for k, v in sorted(self.kinds.items())),
               "sizes (WxHxC): " + ", ".join(f"{k} {v:,}" for k, v in self.sizes.most_common(8))
               + (f" (+{len(self.sizes) - 8} more)" if len(self.sizes) > 8 else "")]
        if self.labels:
            counts = sorted(self.labels.values())
            out.append(f"labels: {len(self.labels)} distinct, {min(self.labels)}..{max(self.labels)}; "
                       f"records per label min {counts[0]}, median {counts[len(counts) // 2]}, max {counts[-1]}")
        out.append("first keys: " + ", ".join(k.decode(errors="replace") for k in self.first_keys))
        if self.manifest:
            m = self.manifest
            ident = m.get("identity", {})
            out.append(f"{_made_by(m)}: state {m.get('state')}, "
                       f"{_count(m.get('records'), 'record')}, {_count(m.get('failures'), 'failure')}; resize "
                       f"{ident.get('resize')}, {'encoded' if ident.get('encoded') else 'raw'}, "
                       f"shuffle {ident.get('shuffle')} seed {ident.get('seed')}")
            if m.get("state") != "complete":
                out.append(f"WARNING: this build is not complete (partial or still being written); {finish_hint(m)}")
            if self.reported:
                out.append(f"failed at build, listed in {FAILURES} (not a database defect): {len(self.reported):,}")
        else:
            out.append("no imgprep manifest (not built by imgprep, or built elsewhere)")
        out.extend(self.problem_lines())
        verdict = self.verdict()
        return out + ([verdict] if verdict else [])

    def problems(self) -> dict[str, list[str]]:
        """Each kind of problem found -> its items as sorted lines (empty kinds left out)."""
        kinds = {
            "undecodable records": [f"{_text(key)}: {why}" for key, why in self.bad_records],
            "missing": [f"{path}: {why}" for path, why in self.missing],
            "extra": [f"{key}: not in the list" for key in self.extra],
            "mislabeled": [f"{key}: stored label {stored}, the list says {listed}"
                           for key, stored, listed in self.mislabeled],
            "under the wrong key": [f"{key}: the list puts it under {expected}" for key, expected in self.misplaced],
        }
        return {kind: sorted(items) for kind, items in kinds.items() if items}

    def problem_lines(self) -> list[str]:
        """The problems grouped by kind: a count, then the first few, sorted."""
        out = []
        for kind, items in self.problems().items():
            out.append(f"{kind}: {len(items):,}")
            out.extend(f"  {item}" for item in items[:SHOWN])
            if len(items) > SHOWN:
                out.append(f"  ... and {len(items) - SHOWN:,} more")
        return out

    def verdict(self) -> str:
        """What was checked and whether it passed, in one line ('' when nothing was checked)."""
        checked = []
        if self.listed is not None:
            failed = len(self.reported)
            if not self.ok:
                checked.append(f"{plural(self.listed, 'entry', 'entries')} checked against the list")
            elif failed:
                checked.append(f"{plural(self.listed, 'entry', 'entries')}: {self.listed - failed:,} present under "
                               f"their key with their label, the other {failed:,} failed at build (listed in {FAILURES})")
            else:
                checked.append(f"{plural(self.listed, 'entry', 'entries')}: every one present under its key with its label")
        if self.verified:
            bad = len(self.bad_records)
            checked.append(f"{plural(self.records - bad, 'record')} decoded" + (f", {bad:,} did not" if bad else ""))
        if not checked:
            return ""
        if self.ok:
            return "OK: " + "; ".join(checked)
        counts = ", ".join(f"{len(items):,} {kind}" for kind, items in self.problems().items())
        return f"FAILED: {'; '.join(checked)}: {counts}"


def _text(key) -> str:
    return key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)


def _made_by(manifest: dict) -> str:
    """'built by imgprep 0.1.0', or for a merge the parts it was made from."""
    parts = manifest.get("merged_from")
    if parts:
        shown = ", ".join(parts[:4]) + (f" and {len(parts) - 4} more" if len(parts) > 4 else "")
        return f"merged by imgprep merge from {len(parts)} parts ({shown})"
    version = manifest.get("imgprep")
    return f"built by imgprep {version}" if version else "built by imgprep"


def inspect_db(path, list_path=None, verify: bool = False, show_progress: bool = True,
               allow_partial: bool = False) -> Inspection:
    """Describes the database at `path`; with `list_path`, checks that every entry is in it under its
    key with its label; with `verify`, decodes every record. Long checks show progress on stderr. An
    incomplete imgprep build is refused unless `allow_partial`."""
    path = Path(path)
    if list_path is not None:
        try:
            require_regular(list_path)  # before the pass over the database; a FIFO would block after it
        except FileNotFoundError:
            raise ImgprepError(f"list {list_path} does not exist") from None
    result = Inspection(path, manifest=read_manifest(path), verified=verify)
    require_complete(path, result.manifest, allow_partial)
    checking = verify or list_path is not None
    with Reader(path) as reader:
        result.backend = reader.backend
        total = record_count(reader, result.manifest) if checking else None
        progress = Progress("inspect", total, unit="rec", enabled=show_progress and checking)
        stored_labels = {}
        for key, value in reader.items():
            if len(result.first_keys) < 3:
                result.first_keys.append(key)
            result.records += 1
            try:
                datum = decode_datum(value)
            except RecordError as e:
                result.bad_records.append((key, str(e)))
                if result.records == 1 and not verify:
                    raise ImgprepError(f"{path} does not hold Caffe Datum records: {e}") from None
                continue
            kind = "encoded" if datum.encoded else "raw"
            result.kinds[kind] += 1
            result.labels[datum.label] += 1
            stored_labels[key] = datum.label
            if verify and datum.encoded:
                try:
                    _, img = decode_upright(datum.data)
                    result.sizes[f"{img.width}x{img.height}x{len(img.getbands())}"] += 1
                except ImageFailure as e:
                    result.bad_records.append((key, e.reason + ": " + e.detail))
            else:
                try:
                    c, h, w = datum_shape(datum)
                    result.sizes[f"{w}x{h}x{c}"] += 1
                except RecordError as e:
                    result.bad_records.append((key, str(e)))
            progress.update()
    if list_path is not None:
        _compare_with_list(result, Path(list_path), stored_labels)
    progress.finish(f"inspect: {plural(result.records, 'record')} read in {progress.elapsed:.1f}s")
    return result


def _compare_with_list(result: Inspection, list_path: Path, stored_labels: dict) -> None:
    entries = read_list(list_path, allow_outside_root=True)
    result.listed = len(entries)
    identity = (result.manifest or {}).get("identity", {})
    shuffle, seed = identity.get("shuffle", False), identity.get("seed", 0)
    if shuffle and "order_sha256" not in identity:  # built before the order was imgprep's own
        order = np.random.default_rng(seed).permutation(len(entries))
    else:
        order = list_order(len(entries), shuffle, seed)
    failed = {(f.position, f.path): f.reason for f in read_failures(result.path)}
    by_path = {key.split(b"_", 1)[1]: key for key in stored_labels if b"_" in key}
    expected_keys = set()
    for position, index in enumerate(order):
        rel, label = entries.paths[index], int(entries.labels[index])
        key = entry_key(position, rel)
        expected_keys.add(key)
        if key in stored_labels:
            if stored_labels[key] != label:
                result.mislabeled.append((key.decode(errors="replace"), stored_labels[key], label))
            continue
        found = by_path.get(rel.encode("utf-8", "surrogateescape"))
        if found is not None:
            result.misplaced.append((found.decode("utf-8", "surrogateescape"), key.decode(errors="replace")))
        elif (position, rel) in failed:
            result.reported.append((rel, failed[position, rel]))
        else:
            result.missing.append((rel, "not in the database"))
    misplaced = {m[0].encode("utf-8", "surrogateescape") for m in result.misplaced}
    result.extra = [k.decode(errors="replace") for k in stored_labels
                    if k not in expected_keys and k not in misplaced]
