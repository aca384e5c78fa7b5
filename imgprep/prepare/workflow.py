"""`prepare`: the ILSVRC2012 download (or an unpacked tree) to training-ready data in WORK, in one
command that continues wherever it stopped.

The stages, in order, each finished, resumed or skipped by its own means:

- lists: make-lists into WORK/lists (from the archives, read in place, or from the tree);
- train, val: build-lmdb of each list into WORK/train_lmdb (shuffled with the seed) and
  WORK/val_lmdb (list order; train_leveldb and val_leveldb with that backend); a stopped build is
  continued with build-lmdb's resume;
- mean: compute-mean of the train database: the stored-size mean where every record has one size
  (WORK/mean.binaryproto, --preset caffe), else the mean of the center 224x224 crops of the
  shorter-256 images (WORK/mean224.binaryproto); per-channel values in WORK/means.json;
- check: inspect --list of both databases;
- layers: WORK/caffe_data_layers.prototxt, Caffe's TRAIN and TEST Data layers for them.

WORK/imgprep-prepare.json records, per stage, what it was made from (the download's archives or
tree, the list files' sha256, the databases' build manifests) and the sha256 of what it wrote. A
stage whose record matches is skipped; a database is recognised by its own manifest. A stage whose
inputs changed, or whose output was changed or was not written by prepare, is refused with the
reason; `overwrite` replaces it (build-lmdb's --overwrite for a database), keeping the stages that
still match.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

from imgprep import ImgprepError
from imgprep.prepare.build import BuildOptions, Interrupted, build_database, image_spec
from imgprep.prepare.presets import PRESETS
from imgprep.formats.resizing import parse_resize
from imgprep.prepare.download import DEVKIT_TAR, TRAIN_TAR, VAL_TAR, find_download
from imgprep.prepare.make_lists import find_val_labels, make_lists
from imgprep.formats.manifest import OutputLock, file_sha256, open_own, read_manifest
from imgprep.prepare.mean import MeanTransform, compute_mean, write_mean
from imgprep.prepare.progress import format_bytes, plural
from imgprep.prepare.inspection import inspect_db
from imgprep.prepare.sources import open_source

STATE = "imgprep-prepare.json"
STATE_FORMAT = "imgprep-prepare/1"
STAGES = ("lists", "train", "val", "mean", "check", "layers")
LISTS = "lists"
MEAN_VALUES = "means.json"
LAYERS = "caffe_data_layers.prototxt"
CROP = 224
BATCH = {"train": 256, "val": 50}  # Caffe's ImageNet recipe (models/bvlc_reference_caffenet)


def database_name(part: str, backend: str) -> str:
    """WORK's database folders: train_lmdb, val_lmdb (train_leveldb, val_leveldb)."""
    return f"{part}_{backend}"


@dataclass
class Inputs:
    """What prepare reads: the train and val image roots (archives or folders) and their identity."""

    source: Path
    train: Path
    val: Path
    identity: dict


@dataclass
class StageResult:
    """One stage of `prepare`: whether it ran in this call, how long it took, and what it made."""
    name: str
    ran: bool
    seconds: float | None  # None: not known (finished by another command)
    made: str


@dataclass
class PrepareReport:
    """What `prepare` did: each stage's result, the images that failed, and the lines that use WORK."""
    work: Path
    stages: list[StageResult] = field(default_factory=list)
    failures: int = 0
    usage: list[str] = field(default_factory=list)

    @property
    def ran(self) -> list[str]:
        """The stages that did work in this call (the others were done earlier)."""
        return [s.name for s in self.stages if s.ran]


def _stat_identity(path: Path) -> dict:
    st = os.stat(path)
    return {"path": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def find_inputs(source: Path) -> Inputs:
    """The train and val roots of SOURCE as make-lists reads it: an unpacked tree (SOURCE/train,
    SOURCE/val) or a folder holding the ILSVRC2012 archives. The identity is what the lists depend
    on: the archives' resolved paths, sizes and modification times, or for a tree the modification
    times of its folders (adding or removing an image changes its folder's) and its labels file."""
    source = Path(source)
    if not source.is_dir():
        raise ImgprepError(f"{source} is not a folder; give the folder holding {TRAIN_TAR}, {VAL_TAR} and "
                           f"{DEVKIT_TAR}, or an unpacked tree (train/<wnid>/..., val/...)")
    if (source / "train").is_dir() or (source / "val").is_dir():
        folders = [source / part for part in ("train", "val")]
        missing = [str(f) for f in folders if not f.is_dir()]
        if missing:
            raise ImgprepError(f"the tree {source} has no {' nor '.join(missing)}; prepare needs train/ and val/")
        stamps = {}
        for folder in folders:
            with os.scandir(folder) as it:
                subfolders = sorted(e.name for e in it if e.is_dir())
            for name in ["", *subfolders]:
                stamps[f"{folder.name}/{name}"] = os.stat(folder / name).st_mtime_ns
        labels, table = find_val_labels(source)
        identity = {"the tree's place": os.path.realpath(source),
                    "the folders of train/ and val/ (an image added or removed)":
                        hashlib.sha256(json.dumps(stamps, sort_keys=True).encode()).hexdigest(),
                    **{p.name: _stat_identity(p) for p in (labels, table) if p is not None}}
        return Inputs(source, folders[0], folders[1], identity)
    download = find_download([source])
    if download is None or download.train is None or download.val is None:
        have = ", ".join(p.name for p in (download.train, download.val, download.devkit) if p) if download else ""
        raise ImgprepError(f"{source} holds neither the ILSVRC2012 download ({TRAIN_TAR}, {VAL_TAR} and "
                           f"{DEVKIT_TAR}) nor an unpacked tree (train/, val/)"
                           + (f"; found only {have}" if have else ""))
    files = [p for p in (download.train, download.val, download.devkit) if p is not None]
    return Inputs(source, download.train, download.val, {p.name: _stat_identity(p) for p in files})


class Work:
    """WORK's state file: one record per stage ({state, inputs, outputs: name -> sha256, seconds, ...})."""

    def __init__(self, work: Path):
        self.path = work
        self.file = work / STATE
        self.stages: dict[str, dict] = {}
        self.replaced: dict[str, dict] = {}  # stage -> the outputs it wrote before, while it is made again
        try:
            text = self.file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except OSError as e:
            raise ImgprepError(f"cannot read {self.file}: {e.strerror}") from None
        try:
            data = json.loads(text)
            if data.get("format") != STATE_FORMAT or not isinstance(data.get("stages"), dict):
                raise ValueError(f"format {data.get('format')!r}")
        except (ValueError, AttributeError) as e:
            raise ImgprepError(f"{self.file} is not a state file of imgprep prepare ({e}); it was edited or "
                               "written by something else: move it away to prepare WORK again") from None
        self.stages = data["stages"]

    def save(self) -> None:
        """Writes the state file atomically (a temporary file, synced, then renamed)."""
        tmp = self.file.with_name(STATE + ".tmp")
        tmp.unlink(missing_ok=True)
        with open_own(tmp) as f:
            f.write(json.dumps({"format": STATE_FORMAT, "stages": self.stages}, indent=2, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.file)

    def record(self, stage: str, **fields) -> None:
        """Saves the stage's record. Once it is done again, the outputs of its earlier run that it no
        longer makes (a mean of another size) are removed, if unchanged since prepare wrote them."""
        if self.stages.get(stage) != fields:
            self.stages[stage] = fields
            self.save()
        if fields.get("state") == "done":
            for name, sha in self.replaced.pop(stage, {}).items():
                path = self.path / name
                if name not in fields.get("outputs", {}) and path.is_file() and file_sha256(path) == sha:
                    path.unlink()

    def shas(self, names) -> dict:
        """name -> sha256 of each of WORK's files `names`."""
        return {name: file_sha256(self.path / name) for name in names}

    def is_done(self, stage: str, inputs: dict, outputs: list[str], overwrite: bool, derived: bool = False) -> bool:
        """True when `stage` finished earlier from the same inputs and its outputs are as it wrote them.
        Without `overwrite` it refuses to replace an output prepare did not write or one changed since,
        and to redo a stage whose inputs changed, unless the stage is `derived` (made from prepare's own
        outputs only). A stage that was running, or whose outputs are gone, is done again."""
        rec = self.stages.get(stage) or {}
        ours = rec.get("state") in ("running", "done")
        recorded = rec.get("outputs", {}) if rec.get("state") == "done" else {}
        current = {n: file_sha256(self.path / n) if (self.path / n).is_file() else None for n in recorded}
        if rec.get("state") == "done" and rec.get("inputs") == inputs and current == recorded \
                and set(outputs) <= set(recorded):
            return True
        self.replaced[stage] = recorded
        if overwrite:
            return False
        changed = [n for n, sha in current.items() if sha is not None and sha != recorded[n]]
        foreign = [] if ours else [n for n in outputs if os.path.lexists(self.path / n)]
        if changed or foreign:
            names = ", ".join(str(self.path / n) for n in changed + foreign)
            why = "changed since prepare wrote it" if changed else "already there, not written by imgprep prepare"
            raise ImgprepError(f"{names}: {why}; pass --overwrite to replace it, or choose another WORK")
        if rec.get("state") == "done" and rec.get("inputs") != inputs and not derived:
            old = rec.get("inputs", {})
            differing = sorted(k for k in set(old) | set(inputs) if old.get(k) != inputs.get(k))
            raise ImgprepError(f"the {stage} stage in {self.path} was made from other inputs ({', '.join(differing)} "
                               "changed since); pass --overwrite to make it again from these, or choose another WORK")
        return False


def _fingerprint(db: Path) -> str:
    """A complete build, as its manifest describes it: changes whenever the database is built again."""
    manifest = read_manifest(db) or {}
    if manifest.get("state") != "complete":
        raise ImgprepError(f"{db} is not a complete build; run the same prepare command again")
    keep = {k: manifest.get(k) for k in ("identity", "records", "failures", "started", "finished")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


def disk_bytes(path: Path) -> int:
    """Bytes a file or folder takes on disk (allocated blocks)."""
    paths = [path] if path.is_file() else [Path(d) / f for d, _, files in os.walk(path) for f in files]
    total = 0
    for p in paths:
        st = os.stat(p)
        total += st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size
    return total


def mean_plan(preset: str) -> tuple[str, MeanTransform, str]:
    """(file name, transform, description) of the mean each preset's records allow: one stored size
    gives Caffe's stored-size mean; records of differing sizes (shorter side S) only a crop mean,
    here of the center 224 crops of the shorter-256 image (what evaluation's center crop sees)."""
    resize = parse_resize(PRESETS[preset]["resize"])
    if resize.kind == "squash":
        return "mean.binaryproto", MeanTransform(), f"{resize.width}x{resize.height} stored-size mean"
    shorter = parse_resize("none") if resize.width == 256 else parse_resize("shorter:256")
    return f"mean{CROP}.binaryproto", MeanTransform(shorter, CROP), \
        f"mean of the center {CROP}x{CROP} crops of the shorter-256 images"


@dataclass
class Run:
    """One prepare run: its inputs, options and state, for the stages."""

    inputs: Inputs
    state: Work
    preset: str
    backend: str
    jobs: int | None
    seed: int
    overwrite: bool
    show_progress: bool
    report: PrepareReport
    begin: object = None  # begin(what): the stage's line, printed when it starts doing work
    echo: object = None

    @property
    def work(self) -> Path:
        """The WORK folder."""
        return self.state.path

    def database(self, part: str) -> Path:
        """Where the `part` ('train' or 'val') database goes in WORK, for the run's backend."""
        return self.work / database_name(part, self.backend)


def prepare_data(source, work, preset: str = "resnet", backend: str = "lmdb", jobs: int | None = None, seed: int = 0,
            overwrite: bool = False, show_progress: bool = True, echo=None) -> PrepareReport:
    """Makes WORK ready for training from SOURCE (the folder of the three ILSVRC2012 files, or an
    unpacked tree): lists, the train and val databases, the mean, the check and Caffe's Data layers
    (see the module docstring). Running it again continues wherever it stopped; a finished WORK is
    left as it is. `echo(line)` prints one line per stage and the warnings (default: to stderr, with
    the stages' progress); `summary_lines(report)` is the closing summary."""
    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    if preset not in PRESETS:
        raise ImgprepError(f"unknown preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}")
    source, work = Path(source), Path(work)
    inputs = find_inputs(source)
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ImgprepError(f"cannot create {work}: {e.strerror}") from None
    report = PrepareReport(work)
    with OutputLock(work):
        run = Run(inputs, Work(work), preset, backend, jobs, seed, overwrite, show_progress, report, echo=echo)
        for number, name in enumerate(STAGES, 1):
            label = f"prepare [{number}/{len(STAGES)}] {name}"
            run.begin = lambda what, label=label: echo(f"{label}: {what}")
            start = time.perf_counter()
            try:
                ran = STAGE_FUNCTIONS[name](name, run)
            except (KeyboardInterrupt, Interrupted):
                raise Interrupted(f"interrupted in the {name} stage; what is finished is kept (committed records "
                                  "too): run the same command again to continue") from None
            rec = run.state.stages[name]
            if ran:
                rec["seconds"] = time.perf_counter() - start
                run.state.save()
            else:
                echo(f"{label}: done earlier, kept")
            report.stages.append(StageResult(name, ran, rec.get("seconds"), rec["made"]))
        report.usage = usage_lines(work, preset, backend, run.state)
    return report


def _lists(name: str, run: Run) -> bool:
    names = [f"{LISTS}/{n}" for n in ("train.txt", "val.txt", "synsets.txt", "synset_words.txt")]
    if run.state.is_done(name, run.inputs.identity, names, run.overwrite):
        return False
    run.begin(f"making the lists from {run.inputs.source} in {run.work / LISTS}")
    run.state.record(name, state="running", inputs=run.inputs.identity)
    # is_done has refused lists prepare did not write: any there now are its own, to be made again
    lists = make_lists(run.inputs.source, run.work / LISTS, show_progress=run.show_progress, overwrite=True)
    for warning in lists.warnings:
        run.echo(f"warning: {warning}")
    missing = [n for n in ("train.txt", "val.txt") if n not in lists.written]
    if missing:
        raise ImgprepError(f"make-lists wrote no {' nor '.join(missing)} from {run.inputs.source}")
    written = [f"{LISTS}/{n}" for n in (*lists.written, "synsets.txt", "synset_words.txt")]
    counts = ", ".join(f"{n} {plural(count, 'line')}" for n, count in lists.written.items())
    run.state.record(name, state="done", inputs=run.inputs.identity, outputs=run.state.shas(written),
                     made=f"{run.work / LISTS}: {counts}")
    return True


def _build_options(part: str, preset: str, backend: str, seed: int, jobs: int | None) -> BuildOptions:
    """The preset's records; train shuffled with the seed, val in list order."""
    return BuildOptions(backend=backend, spec=image_spec(preset), shuffle=part == "train", seed=seed, jobs=jobs)


def _database(name: str, run: Run) -> bool:
    list_path = run.work / LISTS / f"{name}.txt"
    root = run.inputs.train if name == "train" else run.inputs.val
    out = run.database(name)
    options = _build_options(name, run.preset, run.backend, run.seed, run.jobs)
    manifest = read_manifest(out) if out.is_dir() else None
    resume = False
    if manifest is not None:
        expected = dict(options.identity(), list_sha256=file_sha256(list_path),
                        **open_source(root, show_progress=run.show_progress).identity())
        built = manifest["identity"]
        differing = sorted(k for k in expected if built.get(k) != expected[k])
        if not differing and manifest["state"] == "complete":
            previous = run.state.stages.get(name, {})
            run.state.record(name, state="done", seconds=previous.get("seconds"),
                             made=_database_made(out, manifest, run.preset))
            run.report.failures += manifest.get("failures", 0)
            return False
        if differing and not run.overwrite:
            details = ", ".join(f"{k}: {built.get(k)!r} -> {expected[k]!r}" for k in differing)
            raise ImgprepError(f"{out} was built from other inputs or options ({details}); pass --overwrite to "
                               "build it again, or choose another WORK")
        resume = not differing
    run.begin(f"{'continuing' if resume else 'building'} {out} from {root}")
    run.state.record(name, state="running")
    build = build_database(list_path, root, out, options, resume=resume, overwrite=run.overwrite and not resume,
                           show_progress=run.show_progress, resume_hint="run the same prepare command again")
    run.report.failures += build.failures
    run.state.record(name, state="done", made=_database_made(out, read_manifest(out), run.preset))
    return True


def _database_made(out: Path, manifest: dict, preset: str) -> str:
    ident = manifest["identity"]
    order = f"shuffled with seed {ident['seed']}" if ident.get("shuffle") else "list order"
    kind = f"{ident['resize']} {'JPEG q' + str(ident['quality']) if ident['encoded'] else 'raw'}"
    failed = manifest.get("failures", 0)
    failures = f"; {plural(failed, 'image')} failed, listed in {out / 'imgprep-failures.tsv'}" if failed else ""
    return (f"{out}: {plural(manifest.get('records', 0), 'record')}, {format_bytes(disk_bytes(out))} "
            f"({ident['backend'].upper()}, --preset {preset}: {kind}, {order}){failures}")


def _mean(name: str, run: Run) -> bool:
    db = run.database("train")
    mean_name, transform, what = mean_plan(run.preset)
    inputs = {"train database": _fingerprint(db), "transform": [str(transform.resize), transform.crop]}
    if run.state.is_done(name, inputs, [mean_name, MEAN_VALUES], run.overwrite):
        return False
    run.begin(f"computing {run.work / mean_name}, the {what}")
    run.state.record(name, state="running", inputs=inputs)
    result = compute_mean(db, transform, run.jobs, show_progress=run.show_progress)
    tmp = {n: run.work / f".tmp{os.getpid()}-{n}" for n in (mean_name, MEAN_VALUES)}  # write_mean: JSON by name
    try:
        write_mean(result, tmp[mean_name], tmp[MEAN_VALUES], overwrite=True)  # its own temporary names
        for n, path in tmp.items():
            os.replace(path, run.work / n)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    values = result.values()
    bgr = " ".join(f"{v:.3f}" for v in values["bgr"])
    made = (f"{run.work / mean_name}: the {what} of {plural(result.count, 'train record')}, "
            f"{format_bytes(disk_bytes(run.work / mean_name))}; per channel (BGR) {bgr} in {run.work / MEAN_VALUES}")
    run.state.record(name, state="done", inputs=inputs, outputs=run.state.shas([mean_name, MEAN_VALUES]), made=made,
                     mean_file=mean_name, bgr=values["bgr"], rgb=values["rgb"])
    return True


def _check(name: str, run: Run) -> bool:
    parts = {part: (run.database(part), run.work / LISTS / f"{part}.txt") for part in ("train", "val")}
    inputs = {f"{part} database": _fingerprint(db) for part, (db, _) in parts.items()}
    inputs.update({f"{part}.txt": file_sha256(list_path) for part, (_, list_path) in parts.items()})
    if run.state.is_done(name, inputs, [], run.overwrite, derived=True):
        return False
    run.begin("inspect --list of both databases")
    run.state.record(name, state="running", inputs=inputs)
    verdicts = []
    for part, (db, list_path) in parts.items():
        result = inspect_db(db, list_path, show_progress=run.show_progress)
        if not result.ok:
            problems = "\n".join(result.problem_lines())
            raise ImgprepError(f"{db} does not match {list_path}:\n{problems}\n{result.verdict()}")
        verdicts.append(f"{part}: {result.verdict()}")
    run.state.record(name, state="done", inputs=inputs, outputs={}, made="; ".join(verdicts))
    return True


def _layers(name: str, run: Run) -> bool:
    text = caffe_layers(run.work, run.preset, run.backend, run.state.stages["mean"])
    inputs = {"content": hashlib.sha256(text.encode()).hexdigest()}
    if run.state.is_done(name, inputs, [LAYERS], run.overwrite, derived=True):
        return False
    run.begin(f"writing {run.work / LAYERS}")
    run.state.record(name, state="running", inputs=inputs)
    tmp = run.work / f".{LAYERS}.tmp{os.getpid()}"
    try:
        with open_own(tmp) as f:
            f.write(text)
        os.replace(tmp, run.work / LAYERS)
    finally:
        tmp.unlink(missing_ok=True)
    run.state.record(name, state="done", inputs=inputs, outputs=run.state.shas([LAYERS]),
                     made=f"{run.work / LAYERS}: Caffe's TRAIN and TEST Data layers for these databases and mean")
    return True


STAGE_FUNCTIONS = {"lists": _lists, "train": _database, "val": _database, "mean": _mean, "check": _check,
                   "layers": _layers}


def caffe_layers(work: Path, preset: str, backend: str, mean: dict) -> str:
    """WORK's Caffe Data layers (prototxt): source, backend, batch_size, crop_size, mirror and the mean
    (`mean`: the mean stage's record), with comments saying what stock Caffe can read."""
    root = work.resolve()
    resize = PRESETS[preset]["resize"]
    mean_file = f'mean_file: "{root / mean["mean_file"]}"'
    if not PRESETS[preset]["encoded"]:
        note = (f"--preset {preset}: {resize} raw records, all of one size: stock (BVLC) Caffe reads them as they "
                "are, with the stored-size mean_file (subtracted at the source pixel, then crop and mirror: Caffe's "
                "ImageNet recipe).")
        mean_lines = [mean_file]
    else:
        bgr = ", ".join(f"{v:.3f}" for v in mean["bgr"])
        note = (f"--preset {preset}: {resize} JPEG records, whose sizes differ. Stock (BVLC) Caffe batches them "
                "only with crop_size set (each record is decoded and cropped to it first; without a crop, a batch "
                "of records of differing sizes fails), and its mean_file must have the records' stored size, which "
                f"they do not share: these layers subtract per-channel mean_value instead (B, G, R: {bgr}, from "
                f"{root / MEAN_VALUES}). caffe-pro (yihui-he) takes the crop-sized mean: replace the three "
                f"mean_value lines with {mean_file}. For stock Caffe's own recipe (256x256 raw records and "
                "mean_file), prepare with --preset caffe.")
        if preset == "resnet480":
            note += " resnet480 records are meant for the imgprep loader's 'resnet' policy; Caffe crops them at 480."
        mean_lines = [f"mean_value: {v:.3f}" for v in mean["bgr"]]
    notes = [f"Caffe Data layers for the databases imgprep prepare made in {root}.", note,
             "Paste them in place of the data layers of a train_val.prototxt; batch_size is Caffe's ImageNet one."]
    lines = [line for text in notes for line in textwrap.wrap(text, 98, initial_indent="# ", subsequent_indent="# ",
                                                              break_on_hyphens=False, break_long_words=False)]
    for phase, part in (("TRAIN", "train"), ("TEST", "val")):
        transform = [f"mirror: {'true' if part == 'train' else 'false'}", f"crop_size: {CROP}", *mean_lines]
        lines += ["layer {", '  name: "data"', '  type: "Data"', '  top: "data"', '  top: "label"',
                  f"  include {{ phase: {phase} }}", "  transform_param {", *(f"    {t}" for t in transform), "  }",
                  "  data_param {", f'    source: "{root / database_name(part, backend)}"',
                  f"    batch_size: {BATCH[part]}", f"    backend: {backend.upper()}", "  }", "}"]
    return "\n".join(lines) + "\n"


def usage_lines(work: Path, preset: str, backend: str, state: Work) -> list[str]:
    """How to use WORK: the Caffe layers file, and the DALI Loader and PyTorch CaffeDataset lines."""
    train, val = (str(work / database_name(p, backend)) for p in ("train", "val"))
    mean = str(work / state.stages["mean"]["mean_file"])
    policy = "resnet" if preset == "resnet480" else "caffe"
    return [
        f"Caffe: the TRAIN and TEST Data layers in {work / LAYERS}",
        "DALI loader (from imgprep import Loader; GPU, or DALI's CPU mode):",
        f'  Loader("{train}", batch_size={BATCH["train"]}, train=True, policy="{policy}", output="torch")',
        f'  Loader("{val}", batch_size={BATCH["val"]}, train=False, policy="center", output="torch")',
        f'  Caffe\'s transform instead of torchvision\'s normalisation: add normalize="{mean}", channel_order="BGR"',
        "PyTorch without DALI (from imgprep import CaffeDataset):",
        f'  CaffeDataset("{train}", train=True)   CaffeDataset("{val}", train=False)',
    ]


def summary_lines(report: PrepareReport) -> list[str]:
    """The closing summary: what was made, its size, each stage's time, and how to use it."""
    earlier = [s.name for s in report.stages if not s.ran]
    if not report.ran:
        head = f"prepare: nothing to do: {report.work} is ready (every stage was done earlier)"
    else:
        head = f"prepare: {report.work} is ready (ran: {', '.join(report.ran)}" + \
               (f"; done earlier: {', '.join(earlier)})" if earlier else ")")
    lines = [head]
    for s in report.stages:
        took = ("     -" if s.seconds is None else f"{s.seconds:6.1f}s") + (" (earlier)" if not s.ran else "")
        lines.append(f"  {s.name:<6} {took:<17} {s.made}")
    lines.append(f"  on disk: {format_bytes(disk_bytes(report.work))} in {report.work}")
    if report.failures:
        lines.append(f"  {plural(report.failures, 'image')} failed (not in the databases): see each database's "
                     "imgprep-failures.tsv")
    return lines + ["Use it:"] + [f"  {line}" for line in report.usage]
