import sys

from conftest import run_cli

from imgprep.env import PILLOW_SIMD, PLAIN_PILLOW, pil_fix_command, pil_kind, pil_report


def test_pil_build_is_classified_from_the_versions():
    assert pil_kind("12.1.1.post0", "12.1.1.post0") == PILLOW_SIMD
    assert pil_kind("11.3.0", None) == PLAIN_PILLOW  # pillow-simd not installed
    assert pil_kind("11.3.0", "12.1.1.post0") == PLAIN_PILLOW  # Pillow installed over pillow-simd
    assert pil_kind("12.1.1", "12.1.1.post0") == PLAIN_PILLOW


def test_plain_pillow_is_said_plainly_with_the_command_that_fixes_it():
    simd = pil_report("12.1.1.post0", "12.1.1.post0", "libjpeg-turbo 2.1.5", "/venv/bin/python")
    assert simd == {"PIL": "12.1.1.post0 (pillow-simd; JPEG: libjpeg-turbo 2.1.5)"}
    plain = pil_report("11.3.0", "12.1.1.post0", "libjpeg-turbo 3.1.1", "/venv/bin/python")
    assert "plain Pillow, NOT pillow-simd" in plain["PIL"]
    assert plain["fix"] == ("/venv/bin/python -m pip uninstall -y pillow pillow-simd && "
                            "/venv/bin/python -m pip install --no-deps --force-reinstall pillow-simd")


def test_doctor_names_the_pil_build_in_use():
    import importlib.metadata as metadata

    import PIL

    try:
        simd_version = metadata.version("pillow-simd")
    except metadata.PackageNotFoundError:
        simd_version = None
    out = run_cli("doctor").stdout
    pil_line = next(line for line in out.splitlines() if line.strip().startswith("PIL:"))
    assert PIL.__version__ in pil_line
    if pil_kind(PIL.__version__, simd_version) == PILLOW_SIMD:
        assert "(pillow-simd;" in pil_line and "fix:" not in out
    else:
        assert "plain Pillow, NOT pillow-simd" in pil_line
        assert f"fix: {pil_fix_command(sys.executable)}" in out


def test_bench_pil_names_the_build_and_times_decode_and_resize(tmp_path):
    import subprocess
    from pathlib import Path

    from imgprep.prepare.sample import make_sample

    make_sample(tmp_path / "sample", classes=2, train_per_class=2, val_per_class=1, seed=0)
    script = Path(__file__).parents[1] / "benchmarks" / "bench_pil.py"
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "sample"), "--passes", "1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("PIL ") and "4 images" in result.stdout
    assert "decode" in result.stdout and "resize to shorter 256" in result.stdout


def test_doctor_shows_the_cache_and_clean_cache_removes_only_entries_of_archives_that_are_gone(tmp_path, monkeypatch):
    import io
    import os
    import subprocess
    import tarfile

    from imgprep.prepare.archives import cache_dir
    from imgprep.prepare.sources import open_source

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    archives = {}
    for name in ("kept", "gone"):
        archives[name] = tmp_path / f"{name}.tar"
        with tarfile.open(archives[name], "w") as tar:
            info = tarfile.TarInfo(f"{name}/image.JPEG")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
        open_source(archives[name], show_progress=False)  # indexes it into the cache
    folder = cache_dir()
    indexes = sorted(folder.rglob("*.idx"))
    assert len(indexes) == 2
    kept_index = next(p for p in indexes if str(archives["kept"]) in p.read_bytes().decode(errors="replace"))
    archives["gone"].unlink()
    (folder / "archive-index" / "future.idx").write_bytes(b"imgprep-archive-index/9\n\x00\x01 binary")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / "archive-index" / f".x.idx.tmp{dead.pid}").write_bytes(b"half")
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

    env = dict(os.environ)
    shown = run_cli("doctor", env=env).stdout
    cache_line = next(line for line in shown.splitlines() if line.strip().startswith("cache:"))
    assert f"{folder}: 4 files, {total:,} bytes" in cache_line
    assert "imgprep doctor --clean-cache removes them" in cache_line
    assert f"indexes {archives['gone']}, which is gone" in shown
    assert "future.idx" in shown and "not an archive index this imgprep reads" in shown
    assert "left half-written by a stopped run" in shown
    assert str(kept_index) not in shown  # in use: counted, not listed

    before = kept_index.read_bytes()
    cleaned = run_cli("doctor", "--clean-cache", env=env).stdout
    assert f"removed {folder}" in cleaned and f"kept {kept_index}" in cleaned and "kept " in cleaned
    assert "cache: removed 2 files" in cleaned and "2 files" in cleaned.splitlines()[-1]
    assert sorted(p.name for p in folder.rglob("*") if p.is_file()) == sorted([kept_index.name, "future.idx"])
    assert kept_index.read_bytes() == before
    open_source(archives["kept"], show_progress=False)
    assert kept_index.read_bytes() == before  # still the archive's index: not made again
