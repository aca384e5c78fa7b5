"""make-lists: `train.txt` / `val.txt` (and `test.txt`) with Caffe's labels from an unpacked ILSVRC tree or the
downloaded archives, val labels from the devkit, Kaggle's solution or val/<wnid>/ folders, and the ILSVRC2012
count checks."""
from __future__ import annotations

import bz2
import csv
import gzip
import io
import lzma
import os
import posixpath
import re
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgprep import ImgprepError
from imgprep.prepare.download import DEVKIT_TAR, TRAIN_TAR, VAL_TAR, MemberListing, TreeListing, find_download
from imgprep.prepare.progress import Progress, plural
from imgprep.prepare.archives import compression, decompress_command
from imgprep.formats.files import open_user_file, read_user_file
from imgprep.formats.manifest import file_sha256
from imgprep.prepare.sources import open_source

from imgprep.formats.lists import ILSVRC2012_COUNTS, SHOWN, is_image_name, load_synset_words, load_synsets, read_text, write_list


DEVKIT_GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"


DEVKIT_ID_TABLE_NAMES = ("meta.mat", "ILSVRC2012_id_to_wnid.csv")


KAGGLE_SOLUTION = "LOC_val_solution.csv"


ID_RE = re.compile(r"[0-9]+")


def replace_files(folder: Path, writers: dict, overwrite: bool = False) -> dict:
    """Writes each `name: write(path) -> result` to a temporary file in `folder`, then renames them
    all into place: an error on the way leaves every earlier file of the set as it was. Without
    `overwrite`, a file already there is replaced only by the same bytes (a run made again); any
    other is refused, and nothing of the set is replaced."""
    for name in writers:  # refused before anything is written: renaming onto them would fail half-way
        if (folder / name).is_dir() and not (folder / name).is_symlink():
            raise ImgprepError(f"{folder / name} is a folder; make-lists writes a file of that name there. "
                               "Move it, or choose another --out")
    temporary = {name: folder / f".{name}.tmp{os.getpid()}" for name in writers}
    try:
        results = {name: write(temporary[name]) for name, write in writers.items()}
        if not overwrite:
            differing = [name for name, tmp in temporary.items() if _differs(folder / name, tmp)]
            if differing:
                raise ImgprepError(
                    f"{folder} already holds {', '.join(differing)}, not what this run makes (edited, or made "
                    "from other inputs); nothing was replaced: pass --overwrite to replace them, or choose "
                    "another folder")
        for name, tmp in temporary.items():
            os.replace(tmp, folder / name)
        return results
    finally:
        for tmp in temporary.values():
            tmp.unlink(missing_ok=True)


def _differs(existing: Path, new: Path) -> bool:
    """Whether `existing` is there and holds other bytes than `new` (a link or folder always differs)."""
    if not os.path.lexists(existing):
        return False
    if existing.is_symlink() or not existing.is_file():
        return True
    return existing.stat().st_size != new.stat().st_size or file_sha256(existing) != file_sha256(new)


@dataclass
class ScanResult:
    """The images a scan found (relative names) and the non-image files it skipped."""
    images: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # non-image files


def _scan_images(listing, folder: str, result: ScanResult, progress: Progress | None) -> None:
    """The images in `folder` of a listing.py listing (a tree or an archive's members), named
    `folder/name`; everything else is counted as skipped."""
    prefix = f"{folder}/" if folder else ""
    for name, is_dir in listing.entries(folder):
        rel = f"{prefix}{name}"
        if is_dir:
            result.skipped.append(rel + "/")
        elif is_image_name(name):
            result.images.append(rel)
            if progress:
                progress.update()
        else:
            result.skipped.append(rel)


def _subdirs(listing, folder: str = "") -> list[str]:
    return [name for name, is_dir in listing.entries(folder) if is_dir]


def _loose_files(listing, folder: str = "") -> list[str]:
    return [name for name, is_dir in listing.entries(folder) if not is_dir]


def _unknown_wnids_error(what: str, unknown: list[str], synsets_source: str) -> ImgprepError:
    return ImgprepError(
        f"{what} name {plural(len(unknown), 'synset')} not in {synsets_source}: "
        f"{', '.join(unknown[:SHOWN])}{' ...' if len(unknown) > SHOWN else ''} "
        "(pass --synsets FILE, or --derive-synsets for a dataset that is not ILSVRC12)")


def read_id_table(path: str | os.PathLike, data: bytes | None = None) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid, from the devkit's meta.mat (needs scipy) or an `id,wnid` CSV; `data`:
    the file's bytes, already read (from an archive member named `path`)."""
    path = Path(path)
    if path.suffix.lower() == ".mat":
        try:
            from scipy.io import loadmat
        except ImportError:
            raise ImgprepError(f"reading {path} needs scipy (pip install scipy), "
                               "or give the table as a CSV of ILSVRC2012_ID,wnid") from None
        try:
            mat = loadmat(io.BytesIO(read_user_file(path, "devkit table") if data is None else data),
                          squeeze_me=True, struct_as_record=False)
        except ImgprepError:
            raise
        except Exception as e:  # scipy raises many kinds on a bad file
            raise ImgprepError(f"cannot read devkit table {path}: {e}") from None
        if "synsets" not in mat:
            raise ImgprepError(f"devkit table {path} holds no variable `synsets`; expected the devkit's data/meta.mat")
        return _mat_id_table(path, np.atleast_1d(mat["synsets"]))
    table = {}
    for lineno, row in enumerate(csv.reader(read_text(path, "ID table", data=data).splitlines()), 1):
        is_id = bool(row) and ID_RE.fullmatch(row[0].strip()) is not None
        if not row or (lineno == 1 and not is_id):
            continue  # blank line or header
        if len(row) < 2 or not is_id:
            raise ImgprepError(f"{path} line {lineno}: expected 'ILSVRC2012_ID,wnid', got {row!r}")
        table[int(row[0])] = row[1].strip()
    return table


def _mat_id_table(path: Path, synsets: np.ndarray) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid from meta.mat's `synsets`: structs whose ILSVRC2012_ID is an integer and
    WNID a string; anything else is an error naming the file and the entry."""
    table: dict[int, str] = {}
    for n, synset in enumerate(synsets.ravel(), 1):
        raw_id, wnid = getattr(synset, "ILSVRC2012_ID", None), getattr(synset, "WNID", None)
        problem = None
        if raw_id is None or wnid is None:
            problem = (f"is {type(synset).__name__} {synset!r:.60}, not a struct with the fields ILSVRC2012_ID and "
                       "WNID")
        else:
            value = np.asarray(raw_id)
            number = value.item() if value.size == 1 and value.dtype.kind in "iuf" else None
            if number is None or not float(number).is_integer():
                problem = f"has ILSVRC2012_ID {raw_id!r:.60}, which is not an integer"
            elif not isinstance(wnid, str):
                problem = f"has WNID {wnid!r:.60}, which is not a string"
            elif int(number) in table:
                problem = f"repeats ILSVRC2012_ID {int(number)}"
        if problem:
            raise ImgprepError(f"devkit table {path}: entry {n} of `synsets` {problem}; expected the devkit's "
                               "data/meta.mat")
        table[int(number)] = wnid
    return table


def read_val_labels(path: str | os.PathLike, id_table: str | os.PathLike | None,
                    data: bytes | None = None, id_table_data: bytes | None = None) -> dict[str, str]:
    """Val file stem -> wnid from Kaggle's solution CSV, the devkit ground truth, or `file wnid` lines.
    `data` / `id_table_data`: the files' bytes, already read (from archive members named so)."""
    path = Path(path)
    lines = [line.strip() for line in read_text(path, "val labels file", data=data).splitlines()]
    body = [line for line in lines if line]
    if body and body[0].startswith("ImageId,"):
        labels = {}
        for lineno, row in enumerate(csv.reader(body[1:]), 2):
            if len(row) < 2 or not row[1].split():
                raise ImgprepError(f"{path} line {lineno}: expected 'ImageId,PredictionString'")
            labels[row[0]] = row[1].split()[0]
        return labels
    if body and all(ID_RE.fullmatch(line) for line in body):
        if id_table is None:
            raise ImgprepError(f"{path} holds devkit ILSVRC2012_IDs; also give the ID->wnid table "
                               "with --val-id-table (the devkit's meta.mat or an ILSVRC2012_ID,wnid CSV)")
        table = read_id_table(id_table, id_table_data)
        missing = sorted({int(x) for x in body} - set(table))
        if missing:
            raise ImgprepError(f"{id_table} has no wnid for ILSVRC2012_ID{'' if len(missing) == 1 else 's'} {missing[:SHOWN]}")
        return {f"ILSVRC2012_val_{i:08d}": table[int(x)] for i, x in enumerate(lines, 1) if x}
    labels = {}
    for lineno, line in enumerate(lines, 1):
        if not line:
            continue
        name, _, wnid = line.rpartition(" ") if " " in line else line.rpartition("\t")
        if not name:
            raise ImgprepError(f"{path} line {lineno}: expected 'filename wnid', got {line!r}")
        labels[os.path.splitext(name.strip())[0]] = wnid.strip()
    return labels


def find_val_labels(root: Path) -> tuple[Path | None, Path | None]:
    """Looks for a val label source in ROOT (and ROOT/devkit/data) under its well-known name."""
    places = [root, root / "devkit" / "data", root / "ILSVRC2012_devkit_t12" / "data"]
    for place in places:
        if (place / KAGGLE_SOLUTION).is_file():
            return place / KAGGLE_SOLUTION, None
    for place in places:
        if (place / DEVKIT_GROUND_TRUTH).is_file():
            for table_place in places:
                for name in DEVKIT_ID_TABLE_NAMES:
                    if (table_place / name).is_file():
                        return place / DEVKIT_GROUND_TRUTH, table_place / name
            return place / DEVKIT_GROUND_TRUTH, None
    return None, None


@dataclass
class ListsReport:
    """What `make_lists` wrote: each file's line count, the warnings, and the non-image files skipped."""

    written: dict[str, int] = field(default_factory=dict)  # file name -> lines
    warnings: list[str] = field(default_factory=list)
    skipped_files: int = 0
    seconds: float = 0.0

    def summary(self, out) -> str:
        """The closing line: each file written with its line count, the time, and the files skipped."""
        written = ", ".join(f"{name} ({plural(n, 'line')})" for name, n in self.written.items())
        skipped = f"; skipped {plural(self.skipped_files, 'non-image file')}" if self.skipped_files else ""
        return f"make-lists: {written} in {self.seconds:.1f}s -> {out}{skipped}"


def make_lists(root, out: str | os.PathLike, synsets_file=None,
               derive_synsets: bool = False, val_labels=None, val_id_table=None,
               show_progress: bool = True, overwrite: bool = False) -> ListsReport:
    """Writes train.txt / val.txt (/ test.txt) for an ILSVRC12-shaped tree ROOT, or for the
    ILSVRC2012 download without unpacking it.

    ROOT (a path, or a list of paths) is one of: an unpacked tree, whose ROOT/train/<wnid>/*.JPEG are
    the training images and ROOT/val/ the validation images; a folder holding the downloaded
    archives under their names (ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar,
    ILSVRC2012_devkit_t12.tar.gz); or those archive files themselves. An archive's members are
    listed as the unpacked tree names its files, so both give the same lists. Validation labels
    come from val/<wnid>/ folders, or from `val_labels` (Kaggle CSV, devkit ground truth plus
    `val_id_table`, or `file wnid` lines), or from the devkit archive, or from such a file found in
    ROOT. ROOT/test/, if present, becomes test.txt with label 0 as in Caffe. Files already in
    `out` are replaced only by the same bytes, unless `overwrite` (replace_files).
    """
    roots = [Path(r) for r in ([root] if isinstance(root, (str, os.PathLike)) else root)]
    out = Path(out)
    report = ListsReport()
    _refuse_package_folder(out)
    train, val, test, found_labels = _inputs(roots, val_labels, val_id_table, show_progress)
    progress = Progress("make-lists", None, unit="files", enabled=show_progress)
    outputs: dict[str, list[tuple[str, int]]] = {}

    if derive_synsets:
        if train is None:
            raise ImgprepError("--derive-synsets needs the train classes (ROOT/train/<class>/ or the train archive)")
        synsets = _subdirs(train)
        _refuse_unwritable_classes(synsets, train)
        synsets_source = "the train folders"
    else:
        synsets = load_synsets(synsets_file)
        synsets_source = str(synsets_file or "the shipped ILSVRC12 synsets")
    label_of = {w: i for i, w in enumerate(synsets)}

    if train is not None:
        classes = _subdirs(train)
        unknown = [c for c in classes if c not in label_of]
        if unknown:
            raise _unknown_wnids_error(f"the classes (folders or class tars) of {train}", unknown, synsets_source)
        loose = _loose_files(train)
        if loose:
            report.warnings.append(f"{plural(len(loose), 'file')} directly in train/ ignored (not in a class "
                                   f"folder): {', '.join(loose[:SHOWN])}")
        entries = []
        for wnid in classes:
            scan = ScanResult()
            _scan_images(train, wnid, scan, progress)
            if not scan.images:
                report.warnings.append(f"class {wnid} has no images")
            report.skipped_files += len(scan.skipped)
            if scan.skipped:
                report.warnings.append(f"skipped {plural(len(scan.skipped), 'non-image entry', 'non-image entries')} in train/{wnid}: "
                                       f"{', '.join(scan.skipped[:3])}")
            entries.extend((p, label_of[wnid]) for p in scan.images)
        outputs["train.txt"] = entries

    if val is not None:
        outputs["val.txt"] = _val_entries(val, label_of, synsets_source, found_labels, val_labels is not None,
                                          report, progress)
    if test is not None:
        scan = ScanResult()
        _scan_images(test, "", scan, progress)
        report.skipped_files += len(scan.skipped)
        outputs["test.txt"] = [(p, 0) for p in scan.images]
    if not (derive_synsets or synsets_file):
        report.warnings += ilsvrc2012_count_warnings(synsets, outputs.get("train.txt"), outputs.get("val.txt"))

    try:
        out.mkdir(parents=True, exist_ok=True)
        writers = {name: (lambda path, e=entries: write_list(path, e)) for name, entries in outputs.items()}
        words = load_synset_words()
        writers["synsets.txt"] = lambda path: path.write_text("".join(f"{w}\n" for w in synsets), encoding="utf-8")
        writers["synset_words.txt"] = lambda path: path.write_text(
            "".join(f"{w} {words.get(w, w)}\n" for w in synsets), encoding="utf-8")
        written = replace_files(out, writers, overwrite)
    except OSError as e:
        raise ImgprepError(f"cannot write the lists to {out}: {e.strerror or e}") from None
    report.written = {name: written[name] for name in outputs}
    report.seconds = progress.elapsed
    return report


def _inputs(roots: list[Path], val_labels, val_id_table, show_progress: bool):
    """(train, val, test listings or None, val label source) for make-lists' ROOT: an unpacked tree,
    a folder of the downloaded archives, or the archive files. The label source is a function
    returning (stem -> wnid, where they came from), or None when none was given or found."""
    for path in roots:
        if not path.exists():
            raise ImgprepError(f"{path} does not exist")
    given = (lambda: (read_val_labels(val_labels, val_id_table), str(val_labels))) if val_labels else None
    folder = roots[0] if len(roots) == 1 and roots[0].is_dir() else None
    if folder is not None and ((folder / "train").is_dir() or (folder / "val").is_dir()):
        def found():
            path, table = find_val_labels(folder)
            return read_val_labels(path, val_id_table or table), str(path)
        trees = [TreeListing(folder / name) if (folder / name).is_dir() else None for name in ("train", "val", "test")]
        return (*trees, given or (found if find_val_labels(folder)[0] else None))
    download = find_download(roots)
    if download is None:
        raise ImgprepError(f"{folder} has neither train/ nor val/ nor the ILSVRC2012 archives ({TRAIN_TAR}, "
                           f"{VAL_TAR}, {DEVKIT_TAR}); expected an ILSVRC12-shaped tree (ROOT/train/<wnid>/*.JPEG, "
                           "ROOT/val/...) or the download")
    if download.train is None and download.val is None:
        raise ImgprepError(f"no image archive among {', '.join(map(str, roots))}: expected {TRAIN_TAR} and/or "
                           f"{VAL_TAR}")
    listings = [MemberListing(open_source(path, show_progress=show_progress).members(), str(path))
                if path else None for path in (download.train, download.val)]
    labels = given
    if labels is None and download.devkit is not None:
        labels = lambda: read_devkit_labels(download.devkit)  # noqa: E731
    if labels is None and folder is not None and find_val_labels(folder)[0]:
        def labels():
            path, table = find_val_labels(folder)
            return read_val_labels(path, val_id_table or table), str(path)
    return (*listings, None, labels)


DECOMPRESSORS = {"gzip": lambda f: gzip.GzipFile(fileobj=f), "bzip2": bz2.BZ2File, "xz": lzma.LZMAFile,
                 None: lambda f: f}


def read_devkit_labels(devkit: Path) -> tuple[dict[str, str], str]:
    """Val file stem -> wnid from the devkit archive's ground truth and meta.mat, read in place."""
    wanted = {DEVKIT_GROUND_TRUTH: None, "meta.mat": None}
    kind = compression(devkit)
    if kind not in DECOMPRESSORS:
        raise ImgprepError(f"the devkit {devkit} is {kind}-compressed; {decompress_command(kind)} it and give the tar")
    try:
        with open_user_file(devkit, "devkit") as raw, DECOMPRESSORS[kind](raw) as stream:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    base = posixpath.basename(member.name)
                    if member.isreg() and base in wanted and \
                            posixpath.basename(posixpath.dirname(member.name)) == "data":
                        wanted[base] = (member.name, tar.extractfile(member).read())
            while stream.read(1 << 20):  # to its end, where the decompressor checks the CRC
                pass
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as e:
        raise ImgprepError(f"the devkit {devkit} is damaged ({e}); fetch it again") from None
    missing = [name for name, found in wanted.items() if found is None]
    if missing:
        raise ImgprepError(f"the devkit {devkit} holds no {' nor '.join(f'data/{m}' for m in missing)}; expected "
                           f"{DEVKIT_TAR} as downloaded")
    (truth_name, truth), (table_name, table) = wanted[DEVKIT_GROUND_TRUTH], wanted["meta.mat"]
    where = f"{devkit}:{truth_name}"
    return read_val_labels(where, f"{devkit}:{table_name}", truth, table), where


def _val_entries(val, label_of, synsets_source, label_source, labels_given, report, progress):
    subdirs = _subdirs(val)
    if subdirs and not labels_given:
        unknown = [c for c in subdirs if c not in label_of]
        if unknown:
            raise _unknown_wnids_error(f"the class folders of {val}", unknown, synsets_source)
        entries = []
        for wnid in subdirs:
            scan = ScanResult()
            _scan_images(val, wnid, scan, progress)
            report.skipped_files += len(scan.skipped)
            entries.extend((p, label_of[wnid]) for p in scan.images)
        return entries

    if label_source is None:
        raise ImgprepError(
            f"{val} is flat and no label source was given or found: pass --val-labels "
            f"(Kaggle {KAGGLE_SOLUTION}, devkit {DEVKIT_GROUND_TRUTH} with --val-id-table, "
            f"or 'filename wnid' lines), give the devkit ({DEVKIT_TAR}), or split val/ into <wnid>/ folders")
    labels, val_labels = label_source()
    unknown = sorted({w for w in labels.values() if w not in label_of})
    if unknown:
        raise _unknown_wnids_error(f"val labels in {val_labels}", unknown, synsets_source)
    scan = ScanResult()
    _scan_images(val, "", scan, progress)
    report.skipped_files += len(scan.skipped)
    if scan.skipped:
        report.warnings.append(f"skipped {plural(len(scan.skipped), 'non-image entry', 'non-image entries')} in val/: "
                               f"{', '.join(scan.skipped[:3])}")
    by_stem = {os.path.splitext(name)[0]: name for name in scan.images}
    unlabeled = [name for stem, name in by_stem.items() if stem not in labels]
    if unlabeled:
        raise ImgprepError(f"{plural(len(unlabeled), 'val image')} {'has' if len(unlabeled) == 1 else 'have'} no label in {val_labels}: "
                           f"{', '.join(unlabeled[:SHOWN])}")
    absent = sorted(stem for stem in labels if stem not in by_stem)
    if absent:
        raise ImgprepError(f"{val_labels} labels {plural(len(absent), 'image')} that {'is' if len(absent) == 1 else 'are'} not in {val}: "
                           f"{', '.join(absent[:SHOWN])}")
    return [(by_stem[stem], label_of[labels[stem]]) for stem in sorted(by_stem)]


def ilsvrc2012_count_warnings(synsets: list[str], train, val) -> list[str]:
    """Warnings when the ILSVRC2012 lists are not the full set (a partial download or extraction, or
    a chosen subset): train not 1,281,167 images in 1,000 classes, val not 50,000 (50 a class).
    `train` / `val`: (path, label) entries, or None when there is no such list."""
    warnings = []
    for part, entries in (("train", train), ("val", val)):
        if entries is None:
            continue
        counts = Counter(label for _, label in entries)
        full, smallest = ILSVRC2012_COUNTS[part]
        if len(entries) == full and len(counts) == len(synsets):
            continue
        missing = [w for i, w in enumerate(synsets) if i not in counts]
        short = [f"{synsets[i]} ({n})" for i, n in sorted(counts.items()) if n < smallest]
        text = (f"{part} holds {len(entries):,} images in {len(counts):,} classes; ILSVRC2012's holds {full:,} in "
                f"{len(synsets):,} (a partial download or extraction, or a subset)")
        why = "the smallest ILSVRC2012 class has" if part == "train" else "ILSVRC2012 has, in each class,"
        for what, names in (("without images", missing), (f"under {smallest} images ({why} {smallest})", short)):
            if names:
                text += f"; {plural(len(names), 'class', 'classes')} {what}: {', '.join(names[:SHOWN])}{' ...' if len(names) > SHOWN else ''}"
        warnings.append(text)
    return warnings


def _refuse_unwritable_classes(classes: list[str], train) -> None:
    """Derived synsets are written one a line, and --synsets and `preview --words` read a line up to its
    first blank: a class folder with a space, tab or other blank, or with bytes that are not UTF-8,
    would make a synsets.txt that names another class. Refused, naming the folders."""
    def writable(name: str) -> bool:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return name.split() == [name]
    bad = [name for name in classes if not writable(name)]
    if bad:
        shown = ", ".join(repr(name) for name in bad[:SHOWN])
        raise ImgprepError(f"--derive-synsets: {plural(len(bad), 'class folder')} of {train} {'holds' if len(bad) == 1 else 'hold'} a blank (space, tab, line "
                           f"break) or bytes that are not UTF-8: {shown}{' ...' if len(bad) > SHOWN else ''}; "
                           "synsets.txt names one class a line, read up to its first blank: rename them")


def _refuse_package_folder(out: Path) -> None:
    """The package's bundled synsets label every ILSVRC12 list; lists never go into them, also not
    through a link."""
    package = Path(__file__).resolve().parent.parent
    real = out.resolve()
    if real == package or package in real.parents:
        raise ImgprepError(f"--out {out} is inside the imgprep package ({real}); make-lists never writes "
                           "into its bundled data: choose another folder")
