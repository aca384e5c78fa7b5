"""`imgprep demo`: every stage on a fresh sample, ending with what was produced and how fast."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import click

from imgprep import ImgprepError
from imgprep.loading.bench import bench_loader, format_table
from imgprep.prepare.build import BuildOptions, build_database
from imgprep.formats.manifest import FAILURES
from imgprep.formats.imageops import ImageSpec
from imgprep.formats.resizing import parse_resize
from imgprep.prepare.inspection import inspect_db
from imgprep.prepare.make_lists import make_lists
from imgprep.prepare.progress import plural
from imgprep.prepare.mean import MeanTransform, compute_mean, write_mean
from imgprep.prepare.download import TRAIN_TAR, VAL_TAR
from imgprep.prepare.sample import make_sample, write_download

# Marks a folder as a demo's own, which the next demo in it may delete.
MARKER = "imgprep-demo.txt"


def prepare_workdir(workdir: Path) -> None:
    """Empties `workdir` for a new demo: a new or empty folder, or an earlier demo's (it holds
    MARKER). Any other folder might hold a user's files and is refused."""
    if workdir.is_symlink():
        raise ImgprepError(f"{workdir} is a symbolic link; give the demo a plain folder")
    if workdir.exists():
        if not workdir.is_dir():
            raise ImgprepError(f"{workdir} is not a folder")
        if any(workdir.iterdir()):
            if not (workdir / MARKER).is_file():
                raise ImgprepError(f"{workdir} is not empty and not an earlier demo's folder (no {MARKER}); "
                                   "the demo deletes its folder first, so give it a new or empty one "
                                   "(or delete this one yourself)")
            shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("Made by `imgprep demo`, which deletes this folder and everything in it "
                                  "when it runs here again.\n")


def run_demo(workdir, seconds: float = 3.0) -> None:
    """`imgprep demo`: makes the bundled sample as the ImageNet download in `workdir`, runs every stage on it
    (lists, three databases, two means, an inspection, and the loader's benchmark with `seconds` per row) and
    prints each result."""
    workdir = Path(workdir)
    try:
        prepare_workdir(workdir)
    except OSError as e:
        raise ImgprepError(f"cannot prepare {workdir}: {e.strerror or e}") from None
    start = time.perf_counter()
    say = lambda text: click.echo(click.style("==> ", fg="green") + text)  # noqa: E731
    say(f"sample: an ILSVRC12-shaped tree with the oddities of real ImageNet -> {workdir / 'sample'}, and the same "
        f"images as the three ILSVRC2012 download files -> {workdir / 'download'}")
    sample = make_sample(workdir / "sample", classes=10, train_per_class=40, val_per_class=10, oddities=True)
    download = workdir / "download"
    write_download(sample.root, download)
    train_tar, val_tar = download / TRAIN_TAR, download / VAL_TAR
    say("make-lists from the download, nothing unpacked: train.txt / val.txt with Caffe's sorted-wnid labels")
    make_lists(download, workdir / "lists")
    resnet = BuildOptions(spec=ImageSpec(parse_resize("shorter:256"), encoded=True, quality=90), shuffle=True)
    caffe = BuildOptions(spec=ImageSpec(parse_resize("squash:256x256"), encoded=False), shuffle=True, backend="leveldb")
    say(f"build-lmdb --preset resnet --shuffle from {TRAIN_TAR} (LMDB of shorter-256 JPEGs); failures are "
        "reported, not lost")
    train = build_database(workdir / "lists" / "train.txt", train_tar, workdir / "train_lmdb", resnet)
    say(f"build-lmdb --preset resnet from {VAL_TAR}")
    build_database(workdir / "lists" / "val.txt", val_tar, workdir / "val_lmdb", resnet)
    say("build-lmdb --preset caffe --backend leveldb (train, raw squash-256 records as in Caffe's recipe)")
    build_database(workdir / "lists" / "train.txt", train_tar, workdir / "train_caffe_leveldb", caffe)
    say("compute-mean: Caffe's 256x256 mean of the raw database, and a 224x224 crop mean of the ResNet one")
    write_mean(compute_mean(workdir / "train_caffe_leveldb"), workdir / "imagenet_mean.binaryproto")
    write_mean(compute_mean(workdir / "train_lmdb", MeanTransform(crop=224)), workdir / "mean224.binaryproto",
               workdir / "mean224.json")
    say("inspect --list train.txt: every listed image is in the database or in the failure report")
    inspection = inspect_db(workdir / "train_lmdb", workdir / "lists" / "train.txt")
    for line in inspection.lines()[:4] + [f"missing (all in the failure report): {len(inspection.missing)}"]:
        click.echo("    " + line)
    say(f"bench-loader: the DALI training pipeline on train_lmdb, {seconds:.0f} s per row")
    failed = {line.split("\t")[1] for line in (workdir / "train_lmdb" / FAILURES).read_text().splitlines()}
    clean = workdir / "lists" / "train_clean.txt"  # the peers cannot skip broken files
    clean.write_text("".join(line + "\n" for line in (workdir / "lists" / "train.txt").read_text().splitlines()
                             if line.rsplit(" ", 1)[0] not in failed))
    rows = bench_loader(workdir / "train_lmdb", batch=32, seconds=seconds, warmup=2,
                        compare=sample.root / "train", compare_list=clean, torch_workers=2)
    click.echo(format_table(rows))
    click.echo(f"demo: done in {time.perf_counter() - start:.0f}s; {plural(train.records, 'train record')} "
               f"({plural(train.failures, 'failed image')} reported in {workdir / 'train_lmdb' / 'imgprep-failures.tsv'}); "
               f"databases, means and lists in {workdir}")
