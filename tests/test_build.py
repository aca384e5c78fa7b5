import hashlib
import json
import os
import random
import signal
import subprocess
import time

import numpy as np
import pytest

from caffe_proto import Datum
from conftest import IMGPREP, assert_clean_error, db_records, loky_workers, run_cli, wait_for_progress
from imgprep.prepare.build import BuildOptions, build_database
from imgprep.formats.manifest import MANIFEST
from imgprep.formats.manifest import FAILURES
from imgprep.formats.codec import decode_datum
from imgprep.formats.imageops import ImageSpec, decode_to_rgb, decode_upright, to_bgr_chw
from imgprep.formats.resizing import parse_resize
from imgprep.formats.lists import read_list
from imgprep.formats.order import permutation
from imgprep.prepare.parallel import SHM_DIR, area_prefix
from imgprep.prepare.sample import ODDITY_OUTCOMES
from imgprep.formats.storage import open_writer

CAFFE = ImageSpec(parse_resize("squash:256x256"), encoded=False)
RESNET = ImageSpec(parse_resize("shorter:256"), encoded=True)


def build(sample_tree, out, spec, backend="lmdb", **kwargs):
    options = BuildOptions(backend=backend, spec=spec, jobs=kwargs.pop("jobs", 2), **kwargs)
    return build_database(sample_tree.lists / "train.txt", sample_tree.root / "train", out, options,
                          show_progress=False)


@pytest.fixture(scope="module")
def built(sample_tree, tmp_path_factory):
    """The four databases of the two presets on the two backends."""
    base = tmp_path_factory.mktemp("built")
    out = {}
    for preset, spec in (("caffe", CAFFE), ("resnet", RESNET)):
        for backend in ("lmdb", "leveldb"):
            path = base / f"{preset}_{backend}"
            out[preset, backend] = (build(sample_tree, path, spec, backend), path)
    return out


@pytest.mark.parametrize("preset", ["caffe", "resnet"])
def test_both_backends_hold_identical_records(built, preset):
    assert db_records(built[preset, "lmdb"][1]) == db_records(built[preset, "leveldb"][1])


@pytest.mark.parametrize("preset", ["caffe", "resnet"])
def test_every_entry_is_a_record_or_a_reported_failure(sample_tree, built, preset):
    report, path = built[preset, "lmdb"]
    entries = read_list(sample_tree.lists / "train.txt")
    failed_kinds = {rel for rel, kind in sample_tree.oddities.items() if ODDITY_OUTCOMES[kind] == "failed"}
    failures = [line.split("\t") for line in (path / FAILURES).read_text().splitlines()]
    assert {f[1] for f in failures} == failed_kinds
    assert {f[2] for f in failures} == {"truncated", "empty", "unreadable"}
    expected_keys = [f"{i:08d}_{p}".encode() for i, p in enumerate(entries.paths) if p not in failed_kinds]
    assert [k for k, _ in db_records(path)] == expected_keys
    assert report.records == len(expected_keys) and report.failures == len(failed_kinds)
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["state"] == "complete" and manifest["records"] == report.records


def test_raw_records_are_caffe_datums_with_bgr_planar_pixels(sample_tree, built):
    entries = read_list(sample_tree.lists / "train.txt")
    label_of = dict(zip(entries.paths, entries.labels.tolist()))
    for key, value in db_records(built["caffe", "lmdb"][1]):
        path = key.decode().split("_", 1)[1]
        reference = Datum()
        reference.ParseFromString(value)  # Google's protobuf, not ours
        assert (reference.channels, reference.height, reference.width) == (3, 256, 256)
        assert reference.label == label_of[path] and reference.encoded is False
        source = (sample_tree.root / "train" / path).read_bytes()
        expected = to_bgr_chw(decode_upright(source, CAFFE)[1])
        assert reference.data == expected.tobytes()


def test_encoded_records_are_caffes_bytes_and_decode_to_the_shorter_256_image(sample_tree, built):
    for key, value in db_records(built["resnet", "lmdb"][1]):
        datum = decode_datum(value)
        assert datum.encoded and datum.data[:2] == b"\xff\xd8"
        # convert_imageset --encoded writes data, label and encoded only
        assert value == Datum(data=datum.data, label=datum.label, encoded=True).SerializeToString()
        image = decode_to_rgb(datum.data)
        assert min(image.shape[:2]) == 256
        path = key.decode().split("_", 1)[1]
        reference = np.asarray(decode_upright((sample_tree.root / "train" / path).read_bytes(), RESNET)[1])
        assert np.abs(image.astype(np.int16) - reference).mean() < 4  # JPEG q90 tolerance


def test_oddities_that_can_be_fixed_are_stored_upright_rgb(sample_tree, built):
    stored = {k.decode().split("_", 1)[1]: decode_datum(v) for k, v in db_records(built["caffe", "lmdb"][1])}
    for rel, kind in sample_tree.oddities.items():
        if ODDITY_OUTCOMES[kind] == "converted":
            assert stored[rel].pixels().shape == (3, 256, 256), kind


def dali_read(path, batch_size, encoded):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=2, device_id=None)
    def pipe():
        value, label = fn.readers.caffe(path=str(path), random_shuffle=False, name="Reader")
        if encoded:
            value = fn.decoders.image(value, device="cpu", output_type=types.RGB)
        return value, label

    p = pipe()
    p.build()
    images, labels = p.run()
    return [np.asarray(images[i]) for i in range(batch_size)], np.asarray(labels.as_tensor()).ravel()


@pytest.mark.parametrize("preset", ["caffe", "resnet"])
def test_dali_readers_caffe_reads_back_labels_and_pixels(built, preset):
    path = built[preset, "lmdb"][1]
    stored = [decode_datum(v) for _, v in db_records(path)]
    images, labels = dali_read(path, len(stored), encoded=preset == "resnet")
    assert labels.tolist() == [d.label for d in stored]
    for image, datum in zip(images, stored):
        if datum.encoded:
            ours = decode_to_rgb(datum.data).astype(np.int16)
            assert image.shape == ours.shape and np.abs(image - ours).mean() < 1.5
        else:  # DALI hands raw records back as if HWC; the bytes are Caffe's CHW BGR
            assert image.tobytes() == datum.data


def test_shuffle_is_seeded_and_keys_follow_the_shuffled_order(sample_tree, tmp_path):
    spec = ImageSpec(parse_resize("squash:16x16"), encoded=False)
    a = build(sample_tree, tmp_path / "a", spec, shuffle=True, seed=1)
    b = build(sample_tree, tmp_path / "b", spec, shuffle=True, seed=1, backend="leveldb")
    build(sample_tree, tmp_path / "c", spec, shuffle=True, seed=2)
    ra, rb, rc = db_records(tmp_path / "a"), db_records(tmp_path / "b"), db_records(tmp_path / "c")
    assert ra == rb and a.records == b.records
    assert [k.split(b"_", 1)[1] for k, _ in ra] != [k.split(b"_", 1)[1] for k, _ in rc]
    entries = read_list(sample_tree.lists / "train.txt")
    labels = {p: l for p, l in zip(entries.paths, entries.labels.tolist())}
    order = permutation(len(entries), 1)  # imgprep's documented order, not numpy's
    identity = json.loads((tmp_path / "a" / MANIFEST).read_text())["identity"]
    assert identity["order"] == "imgprep.order.permutation/1"
    assert identity["order_sha256"] == hashlib.sha256(order.astype("<i8").tobytes()).hexdigest()
    for key, value in ra:
        position, path = key.decode().split("_", 1)
        assert entries.paths[order[int(position)]] == path
        assert decode_datum(value).label == labels[path]
    classes = [labels[k.decode().split("_", 1)[1]] for k, _ in ra[:20]]
    assert len(set(classes)) > 3  # not written in class order


def test_check_size_fails_images_of_another_size(sample_tree, tmp_path):
    report = build(sample_tree, tmp_path / "db", ImageSpec(parse_resize("shorter:64"), encoded=False),
                   check_size=True)
    reasons = report.failure_reasons
    assert reasons.get("size-mismatch", 0) > 10
    shapes = {decode_datum(v).pixels().shape for _, v in db_records(tmp_path / "db")}
    assert len(shapes) == 1


def test_lmdb_map_grows_past_several_doublings(sample_tree, tmp_path):
    report = build(sample_tree, tmp_path / "db", CAFFE, map_size=1 << 20, txn_size=7)
    assert report.map_growths >= 4
    assert len(db_records(tmp_path / "db")) == report.records


def cli_build(sample_tree, out, *extra, **kwargs):
    return run_cli("build-lmdb", sample_tree.lists / "train.txt", sample_tree.root / "train", out, *extra, **kwargs)


def test_existing_databases_are_protected(sample_tree, tmp_path):
    out = tmp_path / "db"
    result = cli_build(sample_tree, out, "--resize", "squash:8x8", "--raw", check=False)
    assert result.returncode == 3 and "failures by reason" in result.stderr
    assert_clean_error(cli_build(sample_tree, out, "--resize", "squash:8x8", "--raw", check=False),
                       "complete database", "--overwrite")
    assert cli_build(sample_tree, out, "--resize", "squash:8x8", "--raw", "--overwrite", check=False).returncode == 3
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["state"] = "building"
    (out / MANIFEST).write_text(json.dumps(manifest))
    assert_clean_error(cli_build(sample_tree, out, "--resize", "squash:8x8", "--raw", check=False),
                       "partial build", "--resume")
    assert_clean_error(cli_build(sample_tree, out, "--resize", "squash:9x9", "--raw", "--resume", check=False),
                       "options differ", "squash:8x8")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("x")
    assert_clean_error(cli_build(sample_tree, tmp_path / "other", "--overwrite", check=False),
                       "neither a database nor an imgprep build")
    assert (tmp_path / "other" / "precious.txt").exists()


def test_bad_list_is_refused_before_any_work(sample_tree, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("n01440764/a.JPEG 0\nn01440764/b.JPEG\nn01440764/c.JPEG minus\n../x.JPEG 1\n")
    result = run_cli("build-lmdb", bad, sample_tree.root / "train", tmp_path / "db", check=False)
    assert_clean_error(result, "3 bad lines", "line 2: missing label", "line 3", "line 4")
    assert not (tmp_path / "db").exists()


def test_symlink_leaving_root_and_missing_files_are_failures(tree_copy, tmp_path):
    secret = tmp_path / "secret.JPEG"
    secret.write_bytes((tree_copy / "val" / "ILSVRC2012_val_00000001.JPEG").read_bytes())
    os.symlink(secret, tree_copy / "train" / "n01440764" / "link.JPEG")
    lst = tmp_path / "list.txt"
    lst.write_text("n01440764/link.JPEG 0\nn01440764/gone.JPEG 0\n")
    report = build_database(lst, tree_copy / "train", tmp_path / "db", BuildOptions(jobs=1), show_progress=False)
    assert report.failure_reasons == {"outside-root": 1, "missing": 1} and report.records == 0
    allowed = build_database(lst, tree_copy / "train", tmp_path / "db2",
                             BuildOptions(jobs=1, allow_outside_root=True), show_progress=False)
    assert allowed.records == 1


def test_max_failures_stops_the_build(sample_tree, tmp_path):
    result = cli_build(sample_tree, tmp_path / "db", "--max-failures", "1", "--jobs", "1", check=False)
    assert_clean_error(result, "more than --max-failures=1")
    assert json.loads((tmp_path / "db" / MANIFEST).read_text())["state"] == "failed"


def _start_build(sample_tree, out, *extra):
    env = dict(os.environ, IMGPREP_PROGRESS_INTERVAL="0")
    return subprocess.Popen([*IMGPREP, "build-lmdb", str(sample_tree.lists / "train.txt"),
                             str(sample_tree.root / "train"), str(out), "--resize", "squash:96x96", "--raw",
                             "--shuffle", "--seed", "3", "--jobs", "2", "--txn-size", "4", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, env=env)


@pytest.mark.parametrize("backend", ["lmdb", "leveldb"])
def test_resume_after_kill_9_equals_an_uninterrupted_build(larger_tree, tmp_path, backend):
    sample_tree = larger_tree
    reference = tmp_path / "reference"
    assert _start_build(sample_tree, reference, "--backend", backend).wait() == 3
    expected = db_records(reference)
    expected_failures = (reference / FAILURES).read_text()
    rng = random.Random(backend)
    for trial in range(3):
        out = tmp_path / f"killed{trial}"
        proc = _start_build(sample_tree, out, "--backend", backend)
        assert wait_for_progress(proc, rng.randrange(20, 550)), "build ended before the kill"
        os.killpg(proc.pid, signal.SIGKILL)  # the build and its workers, as an OOM killer would
        proc.wait()
        assert json.loads((out / MANIFEST).read_text())["state"] == "building"
        assert len(db_records(out)) < len(expected)
        resumed = _start_build(sample_tree, out, "--backend", backend, "--resume")
        _, err = resumed.communicate()
        assert resumed.returncode == 3, err
        assert b"resumed at entry" in err
        assert db_records(out) == expected
        assert (out / FAILURES).read_text() == expected_failures
        assert json.loads((out / MANIFEST).read_text())["state"] == "complete"
        # the killed build's shared-memory areas and loky's semaphores (its resource tracker died with
        # it) are swept
        assert not list(SHM_DIR.glob(f"{area_prefix(proc.pid)}*"))
        assert not list(SHM_DIR.glob(f"sem.loky-{proc.pid}-*"))


def test_a_worker_killed_mid_build_costs_nothing(larger_tree, tmp_path):
    """The OOM killer (or a decoder's segfault) takes one worker: its chunk runs again, and the build
    ends complete and equal to an uninterrupted one."""
    reference = tmp_path / "reference"
    assert _start_build(larger_tree, reference).wait() == 3
    out = tmp_path / "db"
    proc = _start_build(larger_tree, out)
    assert wait_for_progress(proc, 100), "build ended before the kill"
    os.kill(loky_workers(proc.pid)[0], signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == 3 and b"Traceback" not in err, err
    assert db_records(out) == db_records(reference)
    assert (out / FAILURES).read_text() == (reference / FAILURES).read_text()


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(larger_tree, tmp_path):
    out = tmp_path / "db"
    proc = _start_build(larger_tree, out, "--jobs", "1")
    assert wait_for_progress(proc, 50)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate()
    err = err.decode()
    assert proc.returncode == 130 and "Traceback" not in err and "--resume" in err, err
    resumed = _start_build(larger_tree, out, "--jobs", "1", "--resume")
    resumed.communicate()
    assert resumed.returncode == 3 and json.loads((out / MANIFEST).read_text())["state"] == "complete"


def test_ctrl_c_at_the_terminal_stops_workers_and_writer_without_a_traceback(larger_tree, tmp_path):
    """The terminal sends Ctrl-C to the whole process group: workers included. Only the main process
    acts on it; no worker prints a traceback, none is left behind, and --resume finishes the build."""
    out = tmp_path / "db"
    proc = _start_build(larger_tree, out, "--jobs", "2")
    assert wait_for_progress(proc, 50)
    workers = loky_workers(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    err = err.decode()
    assert proc.returncode == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err, err
    time.sleep(0.5)
    assert workers and not [pid for pid in workers if os.path.exists(f"/proc/{pid}") and
                            b"Z" not in open(f"/proc/{pid}/stat", "rb").read().split()[2]]
    resumed = _start_build(larger_tree, out, "--jobs", "2", "--resume")
    resumed.communicate()
    assert resumed.returncode == 3 and json.loads((out / MANIFEST).read_text())["state"] == "complete"


def test_resuming_a_check_size_build_of_encoded_records_reads_the_first_records_size(sample_tree, tmp_path):
    """Encoded records carry no channels/height/width (as Caffe's): their size comes from the image."""
    out = tmp_path / "db"
    args = ("--resize", "squash:32x32", "--encoded", "--check-size", "--jobs", "1", "--txn-size", "5")
    assert cli_build(sample_tree, out, *args, check=False).returncode == 3
    reference = db_records(out)
    writer = open_writer(out, "lmdb")  # as a kill -9 leaves it: the last transactions lost
    with writer.env.begin(write=True) as txn:
        for key, _ in reference[len(reference) // 2:]:
            txn.delete(key)
    writer.close()
    manifest = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps(dict(manifest, state="building")))
    resumed = cli_build(sample_tree, out, *args, "--resume", check=False)
    assert resumed.returncode == 3 and "resumed at entry" in resumed.stderr, resumed.stderr
    assert db_records(out) == reference
