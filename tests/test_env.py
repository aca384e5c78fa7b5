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

    from imgprep.sample import make_sample

    make_sample(tmp_path / "sample", classes=2, train_per_class=2, val_per_class=1, seed=0)
    script = Path(__file__).parents[1] / "benchmarks" / "bench_pil.py"
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "sample"), "--passes", "1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("PIL ") and "4 images" in result.stdout
    assert "decode" in result.stdout and "resize to shorter 256" in result.stdout
