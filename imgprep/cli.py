"""The `imgprep` command: a thin Click layer over the Python API.

Exit status: 0 success; 1 an error (message on stderr, no traceback); 2 bad usage;
3 the work completed but some images failed (listed in the failure report); 130 interrupted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from imgprep import ImgprepError, __version__
from imgprep.prepare.presets import PRESETS

EXIT_IMAGES_FAILED = 3


RERUN = {  # commands whose output has no manifest to say how to continue
    "resize": "finished images are kept: run the same command again to continue",
    "make-lists": "earlier lists are unchanged: run the same command again",
    "compute-mean": "nothing was written: run the same command again",
}


def _rerun_hint(command: str | None, params: dict) -> str:
    """How to continue a command that was stopped (Ctrl-C) or lost a worker, as a sentence: for an
    output with an imgprep manifest, the manifest's own hint (build-lmdb --resume, or the same merge)."""
    hint = RERUN.get(command, "run the same command again")
    out = params.get("out")
    if command in ("build-lmdb", "merge") and out is not None:
        from imgprep.formats.manifest import finish_hint, read_manifest

        try:
            manifest = read_manifest(out)
        except (ImgprepError, OSError):
            manifest = None
        if manifest is not None and manifest["state"] != "complete":
            hint = finish_hint(manifest)
    return hint[0].upper() + hint[1:] + "."


class Command(click.Command):
    """Keeps the parsed parameters where the group's error handler finds them (Context.meta is shared
    between a group's context and its commands')."""

    def invoke(self, ctx):
        """Runs the command, its parameters recorded for the group's handler first."""
        ctx.meta["imgprep.params"] = ctx.params
        return super().invoke(ctx)


class Group(click.Group):
    """Turns ImgprepError (and OSError, a dead worker process) into `Error: message` and exit 1, and
    Ctrl-C into exit 130."""

    command_class = Command

    def invoke(self, ctx):
        """Runs the command, each error a user can act on turned into one message and an exit status."""
        try:
            return super().invoke(ctx)
        except ImgprepError as e:  # exit_code 130: a stage that caught Ctrl-C to say how to continue
            click.echo(f"Error: {e}", err=True)
            ctx.exit(getattr(e, "exit_code", 1))
        except OSError as e:  # the stages translate the errors they expect; this is the net below them
            where = f" ({e.filename})" if e.filename else ""
            click.echo(f"Error: {e.strerror or e}{where}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            hint = _rerun_hint(ctx.invoked_subcommand, ctx.meta.get("imgprep.params", {}))
            click.echo(f"Interrupted. {hint}", err=True)
            ctx.exit(130)
        except Exception as e:  # build-lmdb and resize survive a dying worker; anything else stops here
            from imgprep.prepare.parallel import died_how, worker_died

            if not worker_died(e):
                raise
            hint = _rerun_hint(ctx.invoked_subcommand, ctx.meta.get("imgprep.params", {}))
            click.echo(f"Error: {died_how(e)}: killed for memory, or crashed. {hint}", err=True)
            ctx.exit(1)


class Option(click.Option):
    """A Click option whose default given in words (show_default="all cores") reads
    `[default: all cores]`, not Click's `[default: (all cores)]`."""

    def get_help_record(self, ctx):
        """Click's (option, help) pair, the default in words without parentheses."""
        record = super().get_help_record(ctx)
        if record and isinstance(self.show_default, str):
            record = record[0], record[1].replace(f"default: ({self.show_default})", f"default: {self.show_default}")
        return record


def option(*names, **attrs):
    """click.option with imgprep's Option class."""
    return click.option(*names, cls=Option, **attrs)


def _checked(check):
    """A Click callback running the API's own check of an option's value, so that a bad value is
    bad usage (exit status 2, naming the option), as Click's own type checks are."""

    def callback(ctx, param, value):
        if value is None:
            return value
        try:
            checked = check(value)
        except ImgprepError as e:
            raise click.BadParameter(str(e), ctx, param) from None
        return value if checked is None else checked

    return callback


def _check_resize(value: str) -> None:
    from imgprep.formats.resizing import parse_resize

    parse_resize(value)


def _check_max_aspect(value: float) -> None:
    from imgprep.formats.resizing import check_max_aspect

    check_max_aspect(value)


def _check_policy(value: str) -> None:
    from imgprep.loading.policies import policy

    policy(value)


def _policy_names(value: str) -> list[str]:
    """`--policy a,b` as names, each checked; `all` is every policy, training ones first."""
    from imgprep.loading.policies import EVAL_POLICIES, TRAIN_POLICIES

    names = [n.strip() for n in value.split(",") if n.strip()]
    names = [*TRAIN_POLICIES, *EVAL_POLICIES] if names == ["all"] else names
    for name in names:
        _check_policy(name)
    return names


def _resize_option(default: str | None, default_text: str | None = None):
    return option(
        "--resize", "resize", default=default, metavar="POLICY", show_default=default_text or True,
        callback=_checked(_check_resize),
        help="squash:WxH (ignore aspect, Caffe's recipe), shorter:S (shorter side to S, keep "
             "aspect, ResNet's), or none.")


def jobs_option(workers: str):
    """-j/--jobs, saying what the command's workers are."""
    return option("--jobs", "-j", type=click.IntRange(0), default=0, show_default="all cores",
                  help=f"Parallel workers: {workers}. 0: one per core this process may use.")


def scheduler_option(shared: str, local: str = "processes"):
    """--scheduler, naming what the command's Dask workers must see at the same path."""
    return option(
        "--scheduler", metavar="ADDRESS", default=None, show_default=f"local {local}",
        help=f"Run the workers on a Dask cluster (e.g. tcp://head:8786) instead. Every worker must see "
             f"{shared} at the same path. Needs the dask extra (pip install 'imgprep[dask]').")


quality_option = option("--quality", type=click.IntRange(1, 100), default=90,
                        help="JPEG quality for images that are (re-)encoded.")
allow_partial_option = option(
    "--allow-partial", is_flag=True,
    help="Accept an incomplete imgprep build (stopped, or still being written) and use the records it "
         "holds. Refused otherwise, with the command that finishes it (build-lmdb --resume, or the same "
         "merge again for a merge's output).")
gray_option = option("--gray", is_flag=True, help="Store 1-channel grayscale instead of RGB.")
max_aspect_option = option(
    "--max-aspect", type=float, default=None, show_default="4", metavar="RATIO",
    callback=_checked(_check_max_aspect),
    help="With --resize shorter:S, center-crop the long side of an image longer than RATIO times its "
         "short side to RATIO times it first, so a 500x33 strip becomes a 1024x256 record rather "
         "than 3879x256. 0: no limit (outputs over 100 million pixels still fail).")


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100,
                                          "show_default": True})
@click.version_option(__version__, message="imgprep %(version)s")
def main():
    """Prepare ImageNet-style image trees for training: lists, resizing, Caffe LMDB/LevelDB
    databases, exact mean images, and a DALI loader.

    \b
    A typical run, on the bundled sample:
      imgprep sample work/sample
      imgprep make-lists work/sample --out work/lists
      imgprep build-lmdb work/lists/train.txt work/sample/train work/train_lmdb --preset resnet
      imgprep compute-mean work/train_lmdb work/mean.binaryproto --crop 224
      imgprep bench-loader work/train_lmdb
    Run `imgprep COMMAND --help` for each command's options.
    """


@main.command()
@option("--clean-cache", is_flag=True,
              help="Remove the cache's archive indexes whose archive is gone (or that a stopped run left "
                   "half-written), listing each entry and what became of it.")
def doctor(clean_cache):
    """Show the PIL build, DALI version, devices and backends in use, and imgprep's cache.

    Reads the environment and the cache folder; writes nothing, unless --clean-cache.

    The cache ($XDG_CACHE_HOME/imgprep, default ~/.cache/imgprep) holds one index per archive
    that make-lists, build-lmdb or resize read (a few dozen bytes per member); an index is made
    again whenever it is needed, so removing one costs only the time of one pass over the archive's
    headers. An archive on a drive that is not mounted counts as gone.

    \b
    Examples:
      imgprep doctor
      imgprep doctor --clean-cache
    """
    from imgprep.env import cache_entries, cache_report, clean_cache as clean, describe

    for name, value in describe().items():
        click.echo(f"{name:>14}: {value}")
    entries = cache_entries()
    if clean_cache:
        for line in clean(entries):
            click.echo(line)
    else:
        for line in cache_report(entries)[1]:
            click.echo(f"{'':>16}{line}")


@main.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@option("--classes", type=click.IntRange(1), default=10,
        help="Number of classes (synsets), spread over the shipped 1,000.")
@option("--train-per-class", type=click.IntRange(1), default=20,
        help="Train images per class, in OUT/train/<wnid>/ (--oddities adds 7 more in all).")
@option("--val-per-class", type=click.IntRange(0), default=5,
        help="Val images per class, shuffled into the flat OUT/val/.")
@option("--seed", type=int, default=0, help="Same seed, same tree, byte for byte.")
@option("--oddities", is_flag=True,
              help="Add the files real ImageNet throws at a tool: CMYK JPEG, PNG named .JPEG, RGBA, "
                   "EXIF-rotated, truncated, zero-byte, random bytes.")
@option("--grain", type=click.FloatRange(0, 64), default=0.0,
              help="Sensor-like noise (pixel std-dev). 8 makes files as large and slow to decode as "
                   "ImageNet's (~100 KB each); 0 keeps them small and fast.")
@option("--archives", is_flag=True,
              help="Write the images as the ImageNet download instead of a tree: ILSVRC2012_img_train.tar (a "
                   "tar per class), ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz (ground truth and "
                   "meta.mat).")
def sample(out, classes, train_per_class, val_per_class, seed, oddities, grain, archives):
    """Write a small ILSVRC12-shaped image tree OUT from the bundled photos, to try every command on.

    Reads only the photos shipped with imgprep. Writes OUT/train/<wnid>/<wnid>_<n>.JPEG, a flat
    OUT/val/ILSVRC2012_val_<n>.JPEG, and the val labels as the devkit's ground truth (+ ID table)
    and as Kaggle's LOC_val_solution.csv. With --archives, the same images as the three ILSVRC2012
    download files in OUT. OUT must not already hold a train/ or val/ folder (or the archives).
    Progress (count, rate, ETA) is shown on stderr, then one summary line.

    Each class is one of the bundled photos, assigned arbitrarily: a cup labelled "academic gown"
    is the sample's label, not a wrong one.

    \b
    Examples:
      imgprep sample work/sample --classes 10 --oddities
      imgprep sample work/bench --classes 20 --train-per-class 100 --grain 8
      imgprep sample work/download --archives
    """
    from imgprep.prepare.sample import make_sample

    make_sample(out, classes, train_per_class, val_per_class, seed, oddities, grain, archives)


@main.command("make-lists")
@click.argument("roots", metavar="ROOT...", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("data/ilsvrc12"),
              show_default=True,
              help="Folder for train.txt, val.txt (test.txt), synsets.txt and synset_words.txt (Caffe's "
                   "data/ilsvrc12). Lists already there are replaced only once every new file is written.")
@option("--synsets", "synsets_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              show_default="the shipped 1,000 ILSVRC12 synsets",
              help="Synset list (one wnid per line; line i = label i).")
@option("--derive-synsets", is_flag=True,
              help="Use the sorted train/ folder names as the synsets (non-ImageNet datasets).")
@option("--val-labels", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Val labels for a flat val/: Kaggle LOC_val_solution.csv, devkit "
                   "ILSVRC2012_validation_ground_truth.txt, or 'filename wnid' lines.",
              show_default="found in ROOT (or the devkit archive) by name")
@option("--val-id-table", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              show_default="found beside the ground truth, or the devkit's meta.mat",
              help="For devkit ground truth: the devkit's meta.mat or an "
                   "ILSVRC2012_ID,wnid CSV.")
@option("--overwrite", is_flag=True,
        help="Replace files in --out that differ from what this run makes (a list you edited, or one made "
             "from another tree); without it they are refused. The same lists made again need no flag.")
def make_lists_cmd(roots, out, synsets_file, derive_synsets, val_labels, val_id_table, overwrite):
    """Write train.txt / val.txt ('relative/path label') for an ILSVRC12 tree or the download.

    Reads ROOT (below); writes train.txt, val.txt (test.txt), synsets.txt and synset_words.txt
    in --out, for build-lmdb.

    ROOT is an unpacked tree (ROOT/train/<wnid>/ holds the train images, ROOT/val/ the val images,
    ROOT/test/ becomes test.txt with label 0), or the ImageNet download without unpacking it: a
    folder holding ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and
    ILSVRC2012_devkit_t12.tar.gz, or those files given one by one. Lists made from the archives
    equal those made from the unpacked tree (n01440764/n01440764_10026.JPEG); the train archive is
    indexed once for build-lmdb (see its --help).

    Labels are the wnid's index in the ASCII-sorted synset list (Caffe's convention, not the
    devkit's ILSVRC2012_ID - 1). Val labels come from ROOT/val/<wnid>/ folders, a labels file, or
    the devkit's ground truth and meta.mat (read inside the devkit archive). With the
    shipped synsets, a warning names the classes that are missing or short when the lists are not
    the full ILSVRC2012 (1,281,167 train images in 1,000 classes, 50,000 val).

    \b
    Examples:
      imgprep make-lists /data/ILSVRC2012
      imgprep make-lists ~/Downloads/imagenet --out lists/
      imgprep make-lists ILSVRC2012_img_train.tar ILSVRC2012_img_val.tar ILSVRC2012_devkit_t12.tar.gz
      imgprep make-lists /data/ILSVRC2012 --val-labels LOC_val_solution.csv --out lists/
      imgprep make-lists /data/flowers --derive-synsets --out lists/
    """
    from imgprep.prepare.make_lists import make_lists

    report = make_lists(list(roots), out, synsets_file, derive_synsets, val_labels, val_id_table,
                        overwrite=overwrite)
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(report.summary(out))


@main.command("prepare")
@click.argument("download", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("work", type=click.Path(file_okay=False, path_type=Path))
@option("--preset", type=click.Choice(sorted(PRESETS)), default="resnet",
              help="The records of both databases, as build-lmdb's --preset: caffe (squash 256x256 raw, stock "
                   "Caffe's recipe, with its 256x256 mean), resnet (shorter 256 JPEG, with the 224 crop mean) or "
                   "resnet480 (shorter 480 JPEG, for the loader's resnet policy).")
@option("--backend", type=click.Choice(["lmdb", "leveldb"]), default="lmdb",
        help="The databases' format: LMDB (the loader's, and Caffe's default) or LevelDB.")
@jobs_option("processes decoding and resizing images (compute-mean: threads)")
@option("--seed", type=int, default=0, help="Seed of the train database's shuffled order.")
@option("--overwrite", is_flag=True,
              help="Make again what WORK holds from other inputs or options, or what changed since prepare "
                   "wrote it (refused otherwise); stages that still match are kept.")
def prepare_cmd(download, work, preset, backend, jobs, seed, overwrite):
    """From the ImageNet download (or an unpacked tree) to training-ready data in WORK, in one command.

    Reads DOWNLOAD in place (nothing there is changed); writes everything below in WORK.

    DOWNLOAD holds ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz,
    read in place (or is an unpacked tree: DOWNLOAD/train/<wnid>/, DOWNLOAD/val/). prepare writes
    WORK/lists (make-lists), WORK/train_lmdb (shuffled with --seed) and WORK/val_lmdb (build-lmdb
    --preset; train_leveldb and val_leveldb with --backend leveldb), the train mean (compute-mean: WORK/mean.binaryproto, 256x256, with --preset caffe;
    else WORK/mean224.binaryproto, the center 224 crops' mean) and WORK/means.json (per-channel
    values), checks both databases against their lists (inspect --list), and writes Caffe's TRAIN
    and TEST Data layers for them to WORK/caffe_data_layers.prototxt. It ends with what it made, its
    size, each stage's time and the Loader and CaffeDataset lines that read it.

    Running the same command again continues wherever it stopped (a stopped build is resumed);
    finished stages are kept, and a finished WORK is left as it is. A stage whose inputs changed,
    or whose output prepare did not write, is refused unless --overwrite. Exit status 3: ready,
    but some images failed (listed in each database's imgprep-failures.tsv).

    \b
    Examples:
      imgprep prepare ~/Downloads/imagenet /data/imagenet
      imgprep prepare ~/Downloads/imagenet /data/imagenet-caffe --preset caffe --backend leveldb
      imgprep sample work/download --archives && imgprep prepare work/download work/imagenet
    """
    from imgprep.prepare.workflow import prepare_data, summary_lines

    report = prepare_data(download, work, preset, backend, jobs, seed, overwrite)
    for line in summary_lines(report):
        click.echo(line)
    if report.failures:
        sys.exit(EXIT_IMAGES_FAILED)


@main.command()
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.argument("dst", type=click.Path(file_okay=False, path_type=Path))
@_resize_option("shorter:256")
@quality_option
@gray_option
@max_aspect_option
@jobs_option("processes, each resizing a chunk of images")
@option("--overwrite", is_flag=True,
        help="Redo every output, even up-to-date ones, and accept a DST made with other options.")
@scheduler_option("SRC and DST")
def resize(src, dst, resize, quality, gray, max_aspect, jobs, overwrite, scheduler):
    """Resize every image under SRC into DST as JPEG files, keeping relative paths.

    Reads SRC; writes DST/<relative path> for every image, DST/imgprep-resize.json (the options)
    and DST/imgprep-resize-failures.tsv (the images that could not be used).

    SRC is a folder or an uncompressed tar such as ILSVRC2012_img_train.tar, read in place (its
    class tars' members land in DST/<wnid>/, as unpacking would put them; the archive is indexed
    once, see build-lmdb --help). Outputs newer than their source (for an archive: than the
    archive) are skipped, so running the command again resumes it.
    CMYK, PNG-named-JPEG, EXIF-rotated and other odd inputs become upright RGB JPEGs; unusable
    files are listed in DST/imgprep-resize-failures.tsv (exit status 3).

    \b
    Examples:
      imgprep resize /data/ILSVRC2012/train /data/train256 --resize shorter:256
      imgprep resize /data/ILSVRC2012/train /data/train_sq --resize squash:256x256 --quality 95
      imgprep resize downloads/ILSVRC2012_img_train.tar /data/train256
    """
    from imgprep.prepare.build import image_spec
    from imgprep.prepare.resize import resize_tree

    report = resize_tree(src, dst, image_spec(None, resize, True, quality, gray, max_aspect), jobs,
                         overwrite, scheduler)
    if report.failures:
        sys.exit(EXIT_IMAGES_FAILED)


@main.command("build-lmdb")
@click.argument("list_file", metavar="LIST", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("root", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@option("--preset", type=click.Choice(sorted(PRESETS)), show_default="no preset: the original images as JPEG records",
              help="caffe: squash:256x256 raw records (Caffe's ImageNet recipe). resnet: shorter:256 "
                   "JPEG records (ResNet recipe, fastest with DALI; the loader's caffe, inception, center and "
                   "ten-crop policies). resnet480: shorter:480 JPEG records, for the loader's resnet policy "
                   "(scale augmentation up to 480 without upscaling). Explicit options override it.")
@option("--backend", type=click.Choice(["lmdb", "leveldb"]), default="lmdb",
        help="The database's format: LMDB (the loader's, and Caffe's default) or LevelDB (Caffe's other "
             "backend; one process may open it at a time).")
@_resize_option(None, "the preset's; without one, none: originals stored unresized")
@option("--encoded/--raw", default=None, show_default="the preset's; without one, encoded",
              help="Store JPEG bytes (Datum encoded=true) or raw BGR planar pixels (what Caffe's "
                   "convert_imageset stores without --encoded).")
@quality_option
@gray_option
@max_aspect_option
@option("--shuffle", is_flag=True, help="Write entries in a seeded random order (recommended: "
              "DALI only shuffles within a small buffer).")
@option("--seed", type=int, default=0, help="Seed for --shuffle.")
@option("--check-size", is_flag=True, help="Fail images whose size differs from the first record's.")
@jobs_option("processes decoding and resizing images")
@option("--txn-size", type=click.IntRange(1), default=1000,
              help="Records per write transaction (Caffe commits every 1000).")
@option("--resume", is_flag=True, help="Continue a partial build (after Ctrl-C, a crash, kill -9).")
@option("--overwrite", is_flag=True,
              help="Replace a database at OUT: deletes only the database's files and imgprep's own "
                   "(imgprep-build.json, imgprep-failures.tsv); other files in OUT stay.")
@option("--allow-empty", is_flag=True, help="Build an empty database from a LIST without entries "
              "(refused otherwise, as a likely mistake).")
@option("--keep-going", is_flag=True,
              help="Build even when none of the first entries looked for (up to 1,000, spread over LIST) is in "
                   "ROOT; refused otherwise, as a wrong ROOT would make every entry a failure.")
@option("--max-failures", type=click.IntRange(0), default=None, show_default="never give up",
              help="Give up once more than this many images failed (the records so far are kept).")
@option("--allow-outside-root", is_flag=True,
              help="Accept absolute paths, '..' and symlinks that leave ROOT.")
@option("--num-labels", type=click.IntRange(1), default=None, show_default="no check",
              help="Refuse the list if a label is >= this (e.g. 1000 for ILSVRC12).")
@option("--num-shards", type=click.IntRange(1), default=1,
              help="Build only part --shard-index of this many contiguous parts (see `imgprep merge`).")
@option("--shard-index", type=click.IntRange(0), default=0,
        help="Which part to build, 0 to --num-shards - 1 (part i holds the i-th contiguous range of the "
             "shuffled order).")
@scheduler_option("ROOT and OUT")
@option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def build_lmdb(list_file, root, out, preset, backend, resize, encoded, quality, gray, max_aspect, shuffle, seed,
               check_size, jobs, txn_size, resume, overwrite, allow_empty, keep_going, max_failures,
               allow_outside_root, num_labels, num_shards, shard_index, scheduler, as_json):
    """Build a Caffe Datum database OUT (LMDB or LevelDB) from LIST and the image ROOT.

    Reads LIST and the images it names under ROOT; writes the database in OUT, OUT/imgprep-build.json
    (the build's identity and state) and OUT/imgprep-failures.tsv (the entries that could not be used).

    ROOT is a folder, or an uncompressed tar read in place without unpacking it: ImageNet's
    ILSVRC2012_img_train.tar (its class tars' members are named <wnid>/<file>, as in the unpacked
    tree) or ILSVRC2012_img_val.tar. The archive's headers are read once into an index kept in
    $XDG_CACHE_HOME/imgprep (default ~/.cache/imgprep) and reused while the archive is not rewritten;
    each read checks the member's tar header; the records equal a build from the unpacked tree.

    Keys are '%08d_path' (Caffe's convert_imageset format); every LIST entry becomes a record or
    a line of OUT/imgprep-failures.tsv. Exit status 3 means the database is complete but some
    images failed; 130 means interrupted (Ctrl-C): continue with --resume. LIST must be a
    regular file (not a pipe): --resume checks it is the same list. ROOT, the list's content and
    the options make up the build's identity; --resume refuses to continue with any of them changed,
    and refuses a merge's output (finish that with the same merge command). A ROOT holding none of
    the entries looked for is refused before anything is written (--keep-going builds anyway).

    \b
    Examples:
      imgprep build-lmdb train.txt /data/train train_lmdb --preset resnet --shuffle
      imgprep build-lmdb val.txt /data/val val_lmdb --preset caffe --backend leveldb
      imgprep build-lmdb train.txt /data/train train_lmdb --preset resnet --shuffle --resume
      imgprep build-lmdb train.txt downloads/ILSVRC2012_img_train.tar train_lmdb --preset resnet --shuffle
    """
    from imgprep.prepare.build import BuildOptions, build_database, image_spec, report_to_dict

    options = BuildOptions(backend=backend, spec=image_spec(preset, resize, encoded, quality, gray, max_aspect),
                           shuffle=shuffle, seed=seed, check_size=check_size, jobs=jobs,
                           txn_size=txn_size, max_failures=max_failures, num_labels=num_labels,
                           allow_outside_root=allow_outside_root, num_shards=num_shards,
                           shard_index=shard_index, scheduler=scheduler)
    report = build_database(list_file, root, out, options, resume=resume, overwrite=overwrite,
                            allow_empty=allow_empty, keep_going=keep_going)
    if as_json:
        click.echo(json.dumps(report_to_dict(report)))
    if report.failures:
        sys.exit(EXIT_IMAGES_FAILED)


@main.command("compute-mean")
@click.argument("dbs", metavar="DB...", nargs=-1, required=False,
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", metavar="OUT", required=False, type=click.Path(path_type=Path))
@option("--crop", type=click.IntRange(1), default=None, show_default="no crop",
              help="Center-crop each image (after --resize) to this size: a crop-sized mean such as "
                   "caffe-pro's 224x224, for databases whose images differ in size.")
@_resize_option("none")
@option("--values-out", type=click.Path(dir_okay=False, path_type=Path), show_default="not written",
              help="Also write the per-channel means (BGR and RGB): JSON if the name ends in .json, else text.")
@jobs_option("threads, each summing one key range")
@scheduler_option("each DB", "threads")
@allow_partial_option
@option("--overwrite", is_flag=True, help="Replace OUT and --values-out if they exist.")
def compute_mean_cmd(dbs, out, crop, resize, values_out, jobs, scheduler, allow_partial, overwrite):
    """Write the exact mean image of database DB as a Caffe .binaryproto OUT.

    Reads every record of each DB (LMDB or LevelDB, raw or encoded); writes OUT (and
    --values-out) and prints the per-channel means.

    Several DBs (e.g. the parts of a sharded build) give the mean of all their records: the
    integer sums of the parts are added, so the result equals the merged database's mean. A DB
    named twice (under any name: a bind mount, a link), OUT / --values-out inside a DB, an output
    that cannot be written (no such folder, a symbolic link) and one that exists (unless
    --overwrite) are refused before any work. Each output is written to a temporary file beside
    it, then renamed.

    The file is what Caffe's compute_image_mean writes (num=1, C, H, W, float32 BGR planar), but
    summed in integers: exact at any N, where Caffe's float32 sum drifts past ~65k images.
    LMDB or LevelDB, raw or encoded records. Per-channel means are printed in BGR (Caffe's
    mean_value order) and RGB.

    \b
    Examples:
      imgprep compute-mean train_lmdb imagenet_mean.binaryproto
      imgprep compute-mean train_resnet_lmdb mean224.binaryproto --crop 224 --values-out means.json
      imgprep compute-mean part0 part1 part2 part3 mean.binaryproto
    """
    if out is None or not dbs or out.is_dir():
        given = f" ({out} is a folder: a database, not the file to write)" if out is not None and out.is_dir() else ""
        raise click.UsageError(f"compute-mean needs DB... and OUT: the .binaryproto to write{given}")
    from imgprep.formats.resizing import parse_resize
    from imgprep.prepare.mean import MeanTransform, check_arguments, combine, compute_mean, write_mean

    check_arguments(dbs, out, values_out, overwrite)
    transform = MeanTransform(parse_resize(resize), crop)
    result = combine([compute_mean(db, transform, jobs, scheduler, allow_partial=allow_partial) for db in dbs])
    write_mean(result, out, values_out, overwrite)
    values = result.values()
    click.echo("mean (BGR): " + " ".join(f"{v:.3f}" for v in values["bgr"]))
    click.echo("mean (RGB): " + " ".join(f"{v:.3f}" for v in values["rgb"]))


@main.command("inspect")
@click.argument("db", type=click.Path(exists=True, file_okay=False, path_type=Path))
@option("--list", "list_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              show_default="no list check", help="Check that every entry of this list is in DB under its key with its label.")
@option("--verify", is_flag=True, help="Decode every record (encoded images too).")
@allow_partial_option
def inspect_cmd(db, list_file, verify, allow_partial):
    """Describe database DB and, with --list / --verify, prove nothing was lost or corrupted.

    Reads DB (and the list); writes nothing.

    Prints the backend, record count, raw/encoded, size and label histograms, first keys and the
    imgprep build state. Exit status 1 if any record does not decode or, with --list, if any
    entry is missing, extra, mislabeled or under the wrong key. Entries the build could not use
    (listed in DB/imgprep-failures.tsv) are counted apart and are not an error.

    \b
    Examples:
      imgprep inspect train_lmdb
      imgprep inspect train_lmdb --list train.txt --verify
    """
    from imgprep.prepare.inspection import inspect_db

    result = inspect_db(db, list_file, verify, allow_partial=allow_partial)
    for line in result.lines():
        click.echo(line)
    if not result.ok:
        sys.exit(1)


@main.command("bench-loader")
@click.argument("db", type=click.Path(exists=True, file_okay=False, path_type=Path))
@option("--batch", type=click.IntRange(1), default=256,
        help="Images per batch; a source holding fewer runs with all of them in one batch (its row says so).")
@option("--threads", type=click.IntRange(1), default=None, show_default="cores, at most 8",
        help="DALI CPU threads (reading, and decoding on the CPU).")
@option("--device", type=click.Choice(["auto", "gpu", "cpu"]), default="auto",
        help="Where the loader decodes: the GPU, the CPU (DALI's CPU mode), or auto (the GPU if there is one).")
@option("--seconds", type=float, default=10.0, help="Measured time per row, after warm-up.")
@option("--eval", "eval_policy", is_flag=True, help="Measure the evaluation policy (center crop) instead.")
@option("--compare", type=click.Path(exists=True, file_okay=False, path_type=Path), show_default="not measured",
              help="Folder of the original images (ROOT/<class>/<image>, as torchvision's ImageFolder reads it): "
                   "also measure, in the same run, DALI's file reader on them and a PyTorch DataLoader whose "
                   "workers decode them with Pillow and apply torchvision's transforms (Resize 256 + RandomCrop "
                   "224 + flip, and RandomResizedCrop 224 + flip; torchvision's own where it imports). Files they "
                   "could not read (empty, not an image, truncated) are skipped first, and counted in their rows.")
@option("--compare-list", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              show_default="every image, ImageFolder-style",
              help="With --compare: a 'path label' list of the images under that folder to use.")
@option("--torch-workers", type=click.IntRange(0), default=None, show_default="--threads",
              help="DataLoader worker processes for the PyTorch rows (imgprep's CaffeDataset on DB, and the "
                   "torchvision rows). A LevelDB DB allows one process: use 0 or 1 with it.")
@option("--cpu-share", type=click.FloatRange(0, 1, max_open=True), default=0.0,
              help="Also measure the loader with this share of the records decoded on CPU threads beside the "
                   "GPU decoder (e.g. 0.35 on a 16-core H100 machine).")
@option("--cpu-threads", type=click.IntRange(1), default=None, show_default="--threads",
        help="CPU decode threads for --cpu-share.")
@option("--policy", "policies", metavar="NAME[,NAME...]", default=None, callback=_checked(_policy_names),
        show_default="caffe, or center with --eval",
              help="Measure the loader with each of these policies, one row each, side by side: caffe, resnet, "
                   "inception (training), center, ten-crop (evaluation), or 'all'. The other rows use the first "
                   "one's kind (training or evaluation).")
@option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@allow_partial_option
def bench_loader_cmd(db, batch, threads, device, seconds, eval_policy, compare, compare_list, torch_workers,
                     cpu_share, cpu_threads, policies, as_json, allow_partial):
    """Measure the DALI loader on DB: images/s and ms per batch for the training policy (or --eval's,
    or each --policy; ten-crop counts images, not views).

    Reads DB (and --compare's images); writes nothing; prints one row per source.

    Rows: the imgprep loader (shorter 256, random crop 224 + mirror, normalise; NCHW, fp16 on a
    GPU and fp32 on the CPU); the same LMDB read and decoded only (the ceiling); imgprep's
    CaffeDataset (the same policy in Pillow) through a PyTorch DataLoader with --torch-workers
    workers; with --compare, DALI's file reader on the original JPEGs and torchvision-style
    DataLoaders on them. A source that cannot run shows '-' and the reason instead of a rate.

    \b
    Examples:
      imgprep bench-loader train_lmdb --batch 256 --seconds 20
      imgprep bench-loader train_lmdb --compare /data/ILSVRC2012/train --torch-workers 16
      imgprep bench-loader train_lmdb --threads 6 --cpu-share 0.35 --cpu-threads 10
      imgprep bench-loader train_lmdb --policy all --seconds 5
    """
    from imgprep.loading.bench import bench_loader, format_table, rows_to_dicts

    rows = bench_loader(db, batch, threads, device, seconds, not eval_policy, compare, compare_list,
                        torch_workers=torch_workers, cpu_share=cpu_share, cpu_threads=cpu_threads, policies=policies,
                        allow_partial=allow_partial)
    click.echo(json.dumps(rows_to_dicts(rows)) if as_json else format_table(rows))


@main.command()
@click.argument("db", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", metavar="OUT.png", type=click.Path(dir_okay=False, path_type=Path))
@option("--policy", default=None, metavar="NAME", callback=_checked(_check_policy),
        show_default="caffe, or center with --eval",
              help="The loader policy to show: caffe, resnet, inception (training: three epochs' draws per "
                   "record), center or ten-crop (evaluation: the crop, or the ten views).")
@option("--train/--eval", "train", default=True,
              help="Without --policy: the training policy (caffe) or the evaluation one (center).")
@option("--count", type=click.IntRange(1, 64), default=8,
              help="Records to show: the database's first ones, in key order (one row each).")
@option("--seed", type=int, default=0, help="The loader's seed (the draws shown).")
@option("--words", "words_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              show_default="the shipped ILSVRC12 synsets, as make-lists labels them",
              help="synset_words.txt whose line i names label i (make-lists writes one beside the lists).")
@option("--tile", type=click.IntRange(64, 512), default=160, help="Tile size in pixels.")
@option("--overwrite", is_flag=True, help="Replace OUT.png if it exists.")
@allow_partial_option
def preview(db, out, policy, train, count, seed, words_file, tile, overwrite, allow_partial):
    """Write a contact sheet of DB's first records and the loader's output for them (OUT.png).

    Reads DB's first --count records; writes OUT.png (an existing one only with --overwrite).

    Each row: the stored record with its label, class words and size, then what the policy makes of
    it, de-normalised (RGB 0..255, as a person sees it; PCA lighting included). Look at it before
    training: a BGR/RGB swap (blue faces, orange sky), a rotated photo, a wrong label or crops that
    miss the object are obvious at a glance. Runs in DALI's CPU mode.

    \b
    Examples:
      imgprep preview train_lmdb train.png --policy resnet
      imgprep preview val_lmdb val.png --policy ten-crop --count 4 --words lists/synset_words.txt
    """
    from imgprep.loading.preview import write_preview

    written = write_preview(db, out, policy, train, count, seed, words_file, tile, overwrite, allow_partial)
    click.echo(f"preview: {written}")


@main.command()
@click.argument("workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("build/demo"))
@option("--seconds", type=float, default=3.0, help="Seconds per benchmark row.")
def demo(workdir, seconds):
    """Run every stage on a fresh bundled sample in WORKDIR and summarise.

    Reads only the bundled photos; writes the sample, lists, databases, means in
    WORKDIR (default build/demo) and prints each stage's result and the loader's rate.

    WORKDIR must be new, empty, or an earlier demo's (it holds imgprep-demo.txt): that one is
    deleted first. A folder with anything else in it is refused.

    \b
    Example:
      imgprep demo build/demo
    """
    from imgprep.demo import run_demo

    run_demo(workdir, seconds)


@main.command()
@click.argument("parts", metavar="PART...", nargs=-1, required=True,
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@option("--overwrite", is_flag=True,
              help="Replace a database at OUT: deletes only the database's files and imgprep's own.")
@allow_partial_option
def merge(parts, out, overwrite, allow_partial):
    """Merge the parts of a sharded build into one database OUT.

    Reads every PART (each a complete build-lmdb --num-shards part); writes the database at OUT,
    its imgprep-build.json and the parts' imgprep-failures.tsv, concatenated.

    Each part is `build-lmdb ... --num-shards K --shard-index i` (any scheduler: Dask, a Slurm
    array, a shell loop). The result equals, record for record, a single build of the same list
    with the same options; the failure reports are concatenated. A part named twice (under any
    name: a bind mount, a link), or OUT inside a part, is refused before anything is written. A
    merge that stopped (Ctrl-C, kill) is finished by running the same merge command again (it starts
    over; build-lmdb --resume refuses a merge's output). With --allow-partial the result's state is
    'partial'.

    \b
    Example:
      for i in 0 1 2 3; do imgprep build-lmdb train.txt /data/train part$i --preset resnet \\
          --shuffle --num-shards 4 --shard-index $i & done; wait
      imgprep merge part0 part1 part2 part3 train_lmdb
    """
    from imgprep.prepare.merge import merge_parts

    merge_parts(parts, out, overwrite, allow_partial=allow_partial)
