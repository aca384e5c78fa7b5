"""The benchmark scripts run end to end on a tiny tree and print their tables (speed is not judged here)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def run_benchmark(script, tmp_path, *args):
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--images", "40", "--workdir", str(tmp_path),
                             *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def table_rows(text):
    return {m[1]: float(m[2].replace(",", "")) for m in re.finditer(r"^\| ([^|]+) \| ([\d,]+) \| [\d.]+ \|$", text, re.M)}


def test_bench_build_prints_both_recipes_against_opencv(tmp_path):
    pytest.importorskip("cv2")
    out = run_benchmark("bench_build.py", tmp_path, "--runs", "1")
    assert "40 JPEGs" in out and "Caffe's recipe" in out and "ResNet recipe" in out
    rows = table_rows(out)
    assert {"OpenCV loop, 1 process", "Pillow loop, 1 process", "imgprep, 1 job"} <= rows.keys()
    assert any(re.fullmatch(r"imgprep, \d+ jobs", name) for name in rows)
    assert all(rate > 0 for rate in rows.values())


def test_bench_mean_prints_raw_and_encoded(tmp_path):
    out = run_benchmark("bench_mean.py", tmp_path)
    assert "raw squash-256" in out and "encoded squash-256" in out
    assert "imgprep compute-mean, 1 job(s)" in table_rows(out)


def test_bench_record_source_prints_the_source_alone_and_through_dali(tmp_path):
    out = run_benchmark("bench_record_source.py", tmp_path, "--runs", "1", "--seconds", "0.2", "--batch", "16")
    rows = re.findall(r"^\| (record source[^|]*) \| ([\d,]+) \|", out, re.M)
    assert [name.strip() for name, _ in rows] == ["record source (read by key, parse, crops)",
                                                  "record source through DALI's external_source"]
    assert all(float(rate.replace(",", "")) > 0 for _, rate in rows)


def test_bench_archives_prints_the_tar_and_the_unpack_routes(tmp_path):
    out = run_benchmark("bench_archives.py", tmp_path, "--runs", "1")
    assert "40 JPEGs" in out and "faster without unpacking" in out
    rows = re.findall(r"^\| (.+?) \| ([\d.]+) \| .* \| ([\d,]+) \|$", out, re.M)
    names = [name for name, _, _ in rows]
    assert {"build-lmdb from the train tar", "build-lmdb from the unpacked tree"} <= set(names)
    assert len(rows) == 8 and all(float(rate.replace(",", "")) > 0 for _, _, rate in rows)
