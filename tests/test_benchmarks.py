"""The benchmark scripts run end to end on a tiny tree and print their tables (speed is not judged
here). With IMGPREP_CAFFE_TOOLS set, Caffe's rows must be there too."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
CAFFE = bool(os.environ.get("IMGPREP_CAFFE_TOOLS"))


def run_benchmark(script, tmp_path, *args):
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--images", "40", "--workdir", str(tmp_path),
                             *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def table_rows(text):
    """{method: median rate} of every table row: | method | rate | low-high | ratio | cpu ms | cpu ratio |"""
    row = r"^\| ([^|]+) \| ([\d,]+) \| [\d,]+-[\d,]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$"
    return {m[1]: float(m[2].replace(",", "")) for m in re.finditer(row, text, re.M)}


def test_bench_build_prints_every_recipe_against_its_peers(tmp_path):
    pytest.importorskip("cv2")
    out = run_benchmark("bench_build.py", tmp_path, "--runs", "1")
    assert "40 JPEGs" in out and "Caffe's recipe" in out and "ResNet recipe" in out and "floor:" in out
    rows = table_rows(out)
    assert {"OpenCV loop, 1 process", "imgprep --preset caffe, 1 job", "OpenCV loop shorter-256 q90, 1 process",
            "imgprep --preset resnet (shorter-256 q90), 1 job"} <= rows.keys()
    assert ("goal (all cores): at least 2.5x" in out) == CAFFE
    assert ("Caffe convert_imageset" in rows and "Caffe convert_imageset --encoded" in rows) == CAFFE
    assert all(rate > 0 for rate in rows.values())


def test_bench_mean_prints_raw_and_encoded(tmp_path):
    out = run_benchmark("bench_mean.py", tmp_path, "--records", "40,80", "--runs", "1")
    assert "raw, 40 records" in out and "raw, 80 records" in out and "encoded" in out
    rows = table_rows(out)
    assert "imgprep compute-mean, 1 job" in rows
    assert ("Caffe compute_image_mean" in rows) == CAFFE


def test_bench_imagenet_scale_makes_the_class_tars_and_prints_builds_and_shards(tmp_path):
    result = subprocess.run([sys.executable, str(BENCHMARKS / "bench_imagenet_scale.py"), "--members", "3001",
                             "--rounds", "1", "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "3,001 ~1 KB 16x16 JPEGs" in result.stdout and "archive indexed once" in result.stdout
    rows = re.findall(r"^\| (one build, --jobs 1|one build, default --jobs|4 shards, default --jobs) \| .* \| "
                      r"([\d.]+) \|$", result.stdout, re.M)
    assert [name for name, _ in rows] == ["one build, --jobs 1", "one build, default --jobs", "4 shards, default --jobs"]
    import tarfile
    with tarfile.open(next(tmp_path.glob("imagenet_scale/*.tar"))) as outer:
        classes = outer.getmembers()
    assert len(classes) == 1000 and classes[0].name == "n01440764.tar"
    assert sum(1 for line in open(next(tmp_path.glob("imagenet_scale/train-*.txt")))) == 3001


def test_bench_cores_prints_jobs_and_shards(tmp_path):
    out = run_benchmark("bench_cores.py", tmp_path, "--jobs", "1,2", "--shards", "2")
    assert re.search(r"^\| 2 \| [\d,]+ \| \d+% \|$", out, re.M), out
    assert re.search(r"^\| 2 x 1 jobs \| [\d,]+ \| [\d,]+ \|$", out, re.M), out


def test_bench_codec_prints_both_codecs():
    result = subprocess.run([sys.executable, str(BENCHMARKS / "bench_codec.py")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("| ") >= 6 and "JPEG Datum, 38 KB, decode" in result.stdout


def test_bench_feed_prints_every_policys_cpu_per_record_first_later_and_through_dali(tmp_path):
    out = run_benchmark("bench_feed.py", tmp_path, "--rounds", "3", "--records", "64", "--batch", "16")
    cell = r"([\d.]+) \| ([\d.]+)-([\d.]+)"
    rows = re.findall(rf"^\| ([a-z-]+) \| {cell} \| {cell} \| [\d.]+, [\d.]+ \| {cell} \|$", out, re.M)
    assert [row[0] for row in rows] == ["caffe", "resnet", "inception", "center", "ten-crop"], out
    for row in rows:
        for median, low, high in (row[1:4], row[4:7], row[7:10]):
            assert 0 < float(low) <= float(median) <= float(high)


def test_bench_archives_prints_the_tar_and_the_unpack_routes(tmp_path):
    out = run_benchmark("bench_archives.py", tmp_path, "--runs", "1")
    assert "40 JPEGs" in out and "faster without unpacking" in out
    rows = re.findall(r"^\| (.+?) \| ([\d.]+) \| .* \| ([\d,]+) \|$", out, re.M)
    names = [name for name, _, _ in rows]
    assert {"build-lmdb from the train tar", "build-lmdb from the unpacked tree"} <= set(names)
    assert len(rows) == 8 and all(float(rate.replace(",", "")) > 0 for _, _, rate in rows)
