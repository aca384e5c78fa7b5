"""The Dask route: a real distributed.LocalCluster of worker processes on loopback."""

import os
import signal
import subprocess

import pytest

from conftest import IMGPREP, wait_for_progress, db_records
from imgprep.prepare.build import BuildOptions, build_database
from imgprep.formats.imageops import ImageSpec
from imgprep.formats.resizing import parse_resize
from imgprep.prepare.mean import compute_mean
from imgprep.prepare.resize import resize_tree

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None, silence_logs=40) as cluster:
        with distributed.Client(cluster) as client:
            yield cluster, client


SPEC = ImageSpec(parse_resize("squash:64x64"), encoded=False)


def test_dask_build_resize_and_mean_equal_local(sample_tree, tmp_path, cluster):
    address = cluster[0].scheduler_address
    lst, root = sample_tree.lists / "train.txt", sample_tree.root / "train"
    local = build_database(lst, root, tmp_path / "local", BuildOptions(spec=SPEC, jobs=2, shuffle=True),
                           show_progress=False)
    dask = build_database(lst, root, tmp_path / "dask", BuildOptions(spec=SPEC, shuffle=True, scheduler=address),
                          show_progress=False)
    assert db_records(tmp_path / "dask") == db_records(tmp_path / "local")
    assert (dask.records, dask.failures) == (local.records, local.failures)
    assert (compute_mean(tmp_path / "dask", scheduler=address, show_progress=False).sums
            == compute_mean(tmp_path / "local", jobs=1, show_progress=False).sums).all()
    report = resize_tree(sample_tree.root / "val", tmp_path / "resized", ImageSpec(parse_resize("shorter:64")),
                         scheduler=address, show_progress=False)
    assert report.written == 30 and not report.failures


def test_killed_worker_does_not_lose_images(larger_tree, tmp_path, cluster):
    cluster_, client = cluster
    lst, root = larger_tree.lists / "train.txt", larger_tree.root / "train"
    build_database(lst, root, tmp_path / "local", BuildOptions(spec=SPEC, jobs=2), show_progress=False)
    env = dict(os.environ, IMGPREP_PROGRESS_INTERVAL="0")
    proc = subprocess.Popen([*IMGPREP, "build-lmdb", str(lst), str(root), str(tmp_path / "dask"), "--resize",
                             "squash:64x64", "--raw", "--scheduler", cluster_.scheduler_address],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    assert wait_for_progress(proc, 100)
    pid = next(iter(client.run(os.getpid).values()))
    os.kill(pid, signal.SIGKILL)  # the nanny restarts it; its tasks are retried
    proc.stderr.read()
    proc.wait()
    if proc.returncode not in (0, 3):  # a clear failure must leave a resumable build
        resumed = subprocess.run([*IMGPREP, "build-lmdb", str(lst), str(root), str(tmp_path / "dask"), "--resize",
                                  "squash:64x64", "--raw", "--resume", "--jobs", "2"], capture_output=True)
        assert resumed.returncode == 3, resumed.stderr
    assert db_records(tmp_path / "dask") == db_records(tmp_path / "local")


def test_unreachable_scheduler_is_a_clear_error(sample_tree, tmp_path):
    result = subprocess.run([*IMGPREP, "build-lmdb", str(sample_tree.lists / "train.txt"),
                             str(sample_tree.root / "train"), str(tmp_path / "db"), "--scheduler", "tcp://127.0.0.1:9"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "cannot reach the Dask scheduler" in result.stderr
    assert "Traceback" not in result.stderr
