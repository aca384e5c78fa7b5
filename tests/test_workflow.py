"""`imgprep prepare`: the download to training-ready data in one resumable command."""

import json
import os
import signal
import subprocess

import numpy as np
import pytest
from google.protobuf import text_format

from caffe_proto import NetParameter
from conftest import IMGPREP, assert_clean_error, db_records, run_cli, tmpfs
from imgprep.prepare.build import BuildOptions, build_database, image_spec
from imgprep.formats.resizing import parse_resize
from imgprep.prepare.mean import MeanTransform, compute_mean
from imgprep.formats.codec import load_mean
from imgprep.prepare.sample import make_sample

pytest.importorskip("scipy")  # the devkit's meta.mat

TRAIN, VAL = 3 * 30, 3 * 8


@pytest.fixture(scope="module")
def download(tmp_path_factory):
    """The three ILSVRC2012 files, made from a 3-class sample."""
    folder = tmp_path_factory.mktemp("download")
    make_sample(folder, classes=3, train_per_class=30, val_per_class=8, seed=4, archives=True)
    return folder


@pytest.fixture(scope="module")
def reference(download, tmp_path_factory):
    """An uninterrupted `imgprep prepare` of the download: (WORK, the finished run)."""
    work = tmp_path_factory.mktemp("reference") / "work"
    return work, run_cli("prepare", download, work, "--jobs", "1")


def files(work):
    """Every file under WORK: relative path -> bytes."""
    return {str(p.relative_to(work)): p.read_bytes() for p in sorted(work.rglob("*")) if p.is_file()}


def stamps(work):
    return {str(p.relative_to(work)): (p.stat().st_mtime_ns, p.stat().st_size) for p in work.rglob("*")}


def test_prepare_makes_the_lists_databases_means_check_and_caffe_layers(download, reference):
    work, result = reference
    assert sorted(p.name for p in work.iterdir()) == [
        "caffe_data_layers.prototxt", "imgprep-prepare.json", "imgprep.lock", "lists", "mean224.binaryproto",
        "means.json", "train_lmdb", "val_lmdb"]
    train, val = db_records(work / "train_lmdb"), db_records(work / "val_lmdb")
    assert (len(train), len(val)) == (TRAIN, VAL)
    # the step-by-step commands' records: build-lmdb --preset resnet (train --shuffle --seed 0) from the lists
    for part, records, shuffle in (("train", train, True), ("val", val, False)):
        options = BuildOptions(jobs=1, spec=image_spec("resnet"), shuffle=shuffle, seed=0)
        build_database(work / "lists" / f"{part}.txt", download / f"ILSVRC2012_img_{part}.tar",
                       work.parent / f"by_hand_{part}", options, show_progress=False)
        assert db_records(work.parent / f"by_hand_{part}") == records
    # compute-mean --crop 224 of the train database, and its per-channel values
    expected = compute_mean(work / "train_lmdb", MeanTransform(crop=224), show_progress=False)
    mean = load_mean(work / "mean224.binaryproto")
    assert mean.shape == (3, 224, 224) and np.array_equal(mean, expected.mean.astype(np.float32))
    values = json.loads((work / "means.json").read_text())
    assert values["bgr"] == pytest.approx(expected.channel_means_bgr) and values["count"] == TRAIN

    # the Caffe layers parse as caffe.proto's NetParameter: TRAIN and TEST Data layers for these databases
    net = text_format.Parse((work / "caffe_data_layers.prototxt").read_text(), NetParameter())
    (train_layer, test_layer) = net.layer
    for layer, part, phase, mirror, batch in ((train_layer, "train", 0, True, 256),
                                              (test_layer, "val", 1, False, 50)):
        assert layer.type == "Data" and list(layer.top) == ["data", "label"] and layer.include[0].phase == phase
        assert layer.data_param.source == str((work / f"{part}_lmdb").resolve())
        assert layer.data_param.backend == 1 and layer.data_param.batch_size == batch  # LMDB
        transform = layer.transform_param
        assert transform.crop_size == 224 and transform.mirror == mirror and not transform.mean_file
        assert list(transform.mean_value) == pytest.approx(values["bgr"], abs=1e-3)  # stock Caffe: per channel
    assert "mean_file:" in (work / "caffe_data_layers.prototxt").read_text()  # caffe-pro's alternative, in words

    out = result.stdout
    assert f"train_lmdb: {TRAIN} records" in out and f"val_lmdb: {VAL} records" in out and " KB" in out
    assert f"OK: {TRAIN} entries: every one present under its key with its label" in out
    assert f"OK: {VAL} entries: every one present under its key with its label" in out
    for stage in ("lists", "train", "val", "mean", "check", "layers"):
        assert any(line.split()[:1] == [stage] and line.split()[1].endswith("s") for line in out.splitlines()), stage
    assert f'Loader("{work}/train_lmdb", batch_size=256, train=True' in out
    assert f'CaffeDataset("{work}/val_lmdb", train=False)' in out
    assert [line.split(":")[0] for line in result.stderr.splitlines() if line.startswith("prepare [")] == [
        f"prepare [{i}/6] {stage}" for i, stage in enumerate(("lists", "train", "val", "mean", "check", "layers"), 1)]


def test_the_summarys_loader_and_dataset_lines_read_what_prepare_made(reference):
    pytest.importorskip("torch")
    import re

    from imgprep import CaffeDataset, Loader

    work, result = reference
    calls = re.findall(r"(?:Loader|CaffeDataset)\([^()]*\)", result.stdout)
    caffe_transform = re.search(r'add (normalize="[^"]+", channel_order="BGR")', result.stdout)[1]
    assert len(calls) == 4 and caffe_transform
    calls.append(calls[0].replace(")", f", {caffe_transform})"))
    for call in calls:
        made = eval(call, {"Loader": Loader, "CaffeDataset": CaffeDataset})  # the line as a user pastes it
        if isinstance(made, CaffeDataset):
            image, label = made[0]
            assert tuple(image.shape) == (3, 224, 224) and len(made) in (TRAIN, VAL)
            continue
        with made as loader:
            images, labels = next(iter(loader))
        assert tuple(images.shape[1:]) == (3, 224, 224) and len(labels) == len(images) in (TRAIN, VAL)


def test_prepare_again_on_a_finished_work_does_nothing_and_says_so(download, reference):
    work, _ = reference
    before, contents = stamps(work), files(work)
    result = run_cli("prepare", download, work, "--jobs", "1")
    assert "prepare: nothing to do" in result.stdout and "(earlier)" in result.stdout
    assert result.stderr.count("done earlier, kept") == 6
    assert stamps(work) == before and files(work) == contents


def start(download, work):
    env = dict(os.environ, IMGPREP_PROGRESS_INTERVAL="0")
    return subprocess.Popen([*IMGPREP, "prepare", str(download), str(work), "--jobs", "1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def stop_in(proc, stage, built=0, sig=signal.SIGKILL):
    """Reads the run's stage lines until `stage` starts (and its build reports `built` records), then
    sends `sig`. Returns the stderr lines read and the exit status."""
    seen, started = [], False
    for line in proc.stderr:
        seen.append(line.decode())
        started = started or line.startswith(f"prepare [{stage}".encode())
        progress = line.startswith(b"build-lmdb: ") and b"/" in line.split()[1]
        if started and (not built or (progress and int(line.split()[1].split(b"/")[0]) >= built)):
            proc.send_signal(sig)
            break
    rest = proc.communicate(timeout=60)[1].decode()
    return "".join(seen) + rest, proc.returncode


def test_a_kill_in_each_stage_then_the_same_command_ends_as_an_uninterrupted_run(download, reference, tmp_path):
    work = tmp_path / "work"
    stops = [("1/6] lists", 0, signal.SIGKILL), ("2/6] train", 20, signal.SIGKILL),
             ("3/6] val", 5, signal.SIGINT), ("4/6] mean", 0, signal.SIGKILL), ("5/6] check", 0, signal.SIGKILL),
             ("6/6] layers", 0, signal.SIGKILL)]
    runs = []
    for stage, built, sig in stops:
        stderr, status = stop_in(start(download, work), stage, built, sig)
        runs.append(stderr)
        assert f"prepare [{stage}" in stderr
        if sig == signal.SIGINT:  # Ctrl-C: exit 130, what to do next, no traceback
            assert status == 130 and "run the same command again" in stderr and "Traceback" not in stderr, stderr
        else:
            assert status == -signal.SIGKILL, stderr
        if stage == "2/6] train":  # stopped mid-build: the next run continues it
            assert json.loads((work / "train_lmdb" / "imgprep-build.json").read_text())["state"] == "building"
    assert f"prepare [2/6] train: continuing {work}/train_lmdb" in runs[2]
    assert "prepare [1/6] lists: done earlier, kept" in runs[2]
    result = run_cli("prepare", download, work, "--jobs", "1")
    assert "is ready" in result.stdout and "done earlier: lists, train, val, mean, check" in result.stdout
    reference_work, _ = reference
    made, expected = files(work), files(reference_work)
    for name in ("train_lmdb", "val_lmdb"):
        assert db_records(work / name) == db_records(reference_work / name)
    same = [n for n in expected if n.startswith(("lists/", "mean", "means"))]
    assert len(same) == 6 and all(made[n] == expected[n] for n in same)

    def layers(folder, text):  # the layers, with WORK's path (and the comments, wrapped to its length) left out
        lines = text.decode().replace(str(folder.resolve()), "WORK").splitlines()
        return [line for line in lines if not line.startswith("#")]

    assert layers(work, made["caffe_data_layers.prototxt"]) == layers(reference_work,
                                                                      expected["caffe_data_layers.prototxt"])


def test_a_full_disk_says_to_run_the_same_prepare_and_that_finishes_it(download, reference, tmp_path):
    with tmpfs(tmp_path / "small", "size=1m") as disk:
        result = run_cli("prepare", download, disk / "work", "--jobs", "1", check=False)
        assert_clean_error(result, "disk is full", "run the same prepare command again")
        assert "--resume" not in result.stderr  # prepare has no such option
        subprocess.run(["mount", "-o", "remount,size=200m", str(disk)], check=True)
        result = run_cli("prepare", download, disk / "work", "--jobs", "1")
        assert "is ready" in result.stdout
        reference_work, _ = reference
        for name in ("train_lmdb", "val_lmdb"):
            assert db_records(disk / "work" / name) == db_records(reference_work / name)


def test_changed_inputs_and_options_are_refused_and_overwrite_makes_them_again(tmp_path):
    """An unpacked tree with the odd files real ImageNet has, --preset caffe on LevelDB."""
    tree = tmp_path / "tree"
    make_sample(tree, classes=2, train_per_class=6, val_per_class=2, seed=1, oddities=True)
    work = tmp_path / "work"
    result = run_cli("prepare", tree, work, "--preset", "caffe", "--backend", "leveldb", "--jobs", "1", check=False)
    assert result.returncode == 3, result.stderr  # ready, but three images failed
    assert "3 images failed" in result.stdout and "train_leveldb/imgprep-failures.tsv" in result.stdout
    assert "the other 3 failed at build" in result.stdout
    mean = load_mean(work / "mean.binaryproto")  # one stored size: Caffe's 256x256 mean
    assert mean.shape == (3, 256, 256)
    net = text_format.Parse((work / "caffe_data_layers.prototxt").read_text(), NetParameter())
    assert [layer.data_param.backend for layer in net.layer] == [0, 0]  # LEVELDB
    assert {layer.transform_param.mean_file for layer in net.layer} == {str((work / "mean.binaryproto").resolve())}
    assert not any(layer.transform_param.mean_value for layer in net.layer)
    assert parse_resize("squash:256x256") and "stock (BVLC) Caffe reads them as they are" in \
        " ".join(line.lstrip("# ") for line in (work / "caffe_data_layers.prototxt").read_text().splitlines())
    before = stamps(work)

    other = run_cli("prepare", tree, work, "--backend", "leveldb", check=False)  # --preset resnet
    assert_clean_error(other, "train_leveldb was built from other inputs or options", "resize", "--overwrite")
    assert other.returncode == 1 and stamps(work) == before

    (work / "means.json").write_text("{}\n")
    edited = run_cli("prepare", tree, work, "--preset", "caffe", "--backend", "leveldb", check=False)
    assert_clean_error(edited, "means.json: changed since prepare wrote it", "--overwrite")
    fixed = run_cli("prepare", tree, work, "--preset", "caffe", "--backend", "leveldb", "--overwrite", check=False)
    assert fixed.returncode == 3 and "ran: mean" in fixed.stdout and "done earlier: lists, train, val" in fixed.stdout
    assert json.loads((work / "means.json").read_text())["count"] == 12 + 4  # the oddities that decode count

    (tree / "train" / "n01440764" / "n01440764_10000.JPEG").unlink()
    changed = run_cli("prepare", tree, work, "--preset", "caffe", "--backend", "leveldb", check=False)
    assert_clean_error(changed, "the lists stage", "an image added or removed", "--overwrite")

    foreign = tmp_path / "foreign"
    (foreign / "lists").mkdir(parents=True)
    (foreign / "lists" / "train.txt").write_text("mine 0\n")
    refused = run_cli("prepare", tree, foreign, check=False)
    assert_clean_error(refused, "lists/train.txt: already there, not written by imgprep prepare", "--overwrite")
    assert (foreign / "lists" / "train.txt").read_text() == "mine 0\n"


def test_a_folder_without_the_download_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_clean_error(run_cli("prepare", tmp_path / "empty", tmp_path / "work", check=False),
                       "holds neither the ILSVRC2012 download")
    assert not (tmp_path / "work").exists()
