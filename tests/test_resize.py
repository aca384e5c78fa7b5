import os
import signal
import subprocess

from PIL import Image

from conftest import IMGPREP, assert_clean_error, loky_workers, run_cli, wait_for_progress
from imgprep.imageops import ImageSpec, parse_resize
from imgprep.resize import FAILURES, resize_tree
from imgprep.sample import ODDITY_OUTCOMES


def test_resize_tree_keeps_paths_fixes_oddities_and_reports_failures(sample_tree, tmp_path):
    dst = tmp_path / "out"
    spec = ImageSpec(parse_resize("shorter:128"))
    report = resize_tree(sample_tree.root / "train", dst, spec, jobs=2, show_progress=False)
    failed = {rel for rel, kind in sample_tree.oddities.items() if ODDITY_OUTCOMES[kind] == "failed"}
    assert {f.path for f in report.failures} == failed
    assert report.written == report.total - len(failed)
    for rel, kind in sample_tree.oddities.items():
        if rel not in failed:
            with Image.open(dst / rel) as img:
                assert img.format == "JPEG" and img.mode == "RGB" and min(img.size) == 128, kind
    assert len((dst / FAILURES).read_text().splitlines()) == len(failed)
    again = resize_tree(sample_tree.root / "train", dst, spec, jobs=2, show_progress=False)
    assert again.written == 0 and again.up_to_date == report.written
    touched = next(iter(sorted(p for p in (sample_tree.root / "train").rglob("*_10000.JPEG"))))
    rel = touched.relative_to(sample_tree.root / "train")
    os.utime(dst / rel, ns=(0, 0))  # an output older than its source is redone
    assert resize_tree(sample_tree.root / "train", dst, spec, jobs=1, show_progress=False).written == 1
    assert not list(dst.rglob(".*.tmp*"))


def test_resize_cli_refuses_other_options_on_an_existing_output(sample_tree, tmp_path):
    dst = tmp_path / "out"
    assert run_cli("resize", sample_tree.root / "val", dst, "--resize", "squash:32x32").returncode == 0
    with Image.open(dst / "ILSVRC2012_val_00000001.JPEG") as img:
        assert img.size == (32, 32)
    assert_clean_error(run_cli("resize", sample_tree.root / "val", dst, "--resize", "squash:64x64", check=False),
                       "--overwrite")
    assert run_cli("resize", sample_tree.root / "val", dst, "--resize", "squash:64x64", "--overwrite").returncode == 0


def test_a_worker_killed_mid_resize_costs_nothing(larger_tree, tmp_path):
    src = larger_tree.root / "train"
    env = dict(os.environ, IMGPREP_PROGRESS_INTERVAL="0")

    def start(dst):
        return subprocess.Popen([*IMGPREP, "resize", str(src), str(dst), "--resize", "squash:64x64", "--jobs", "2"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)

    assert start(tmp_path / "reference").wait() == 3
    proc = start(tmp_path / "out")
    assert wait_for_progress(proc, 100, b"resize"), "resize ended before the kill"
    os.kill(loky_workers(proc.pid)[0], signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == 3 and b"Traceback" not in err, err
    written = {p.relative_to(tmp_path / "reference"): p.read_bytes() for p in (tmp_path / "reference").rglob("*.JPEG")}
    assert {p.relative_to(tmp_path / "out"): p.read_bytes() for p in (tmp_path / "out").rglob("*.JPEG")} == written
    assert (tmp_path / "out" / FAILURES).read_text() == (tmp_path / "reference" / FAILURES).read_text()
