import io
import os
import signal
import subprocess

import pytest
from PIL import Image

from conftest import IMGPREP, assert_clean_error, folder_alias, loky_workers, run_cli, wait_for_progress
from imgprep.formats.imageops import ImageSpec
from imgprep.formats.resizing import parse_resize
from imgprep.prepare.resize import FAILURES, resize_tree, walk_images
from imgprep.prepare.sample import ODDITY_OUTCOMES


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


def _small_tree(root):
    """SRC with two good JPEGs in a/ and b/, and a 1x300 PNG that no JPEG can hold at shorter:256."""
    for folder in ("a", "b"):
        (root / folder).mkdir(parents=True)
        Image.new("RGB", (40, 30), (200, 10, 10)).save(root / folder / "x.JPEG")
    Image.new("L", (1, 300)).save(root / "b" / "strip.JPEG", "PNG")
    return root


def test_resize_never_writes_through_a_link_it_did_not_make(tmp_path):
    src = _small_tree(tmp_path / "src")
    dst, outside = tmp_path / "dst", tmp_path / "outside"
    dst.mkdir()
    outside.mkdir()
    (dst / "a").symlink_to(outside)  # DST/a -> outside/
    (dst / "b").mkdir()
    (outside / "victim.JPEG").write_bytes(b"mine")
    (dst / "b" / "x.JPEG").symlink_to(outside / "victim.JPEG")  # DST/b/x.JPEG -> outside/victim.JPEG
    report = resize_tree(src, dst, ImageSpec(parse_resize("squash:8x8")), jobs=1, show_progress=False)
    assert sorted(os.listdir(outside)) == ["victim.JPEG"] and (outside / "victim.JPEG").read_bytes() == b"mine"
    assert {(f.path, f.reason) for f in report.failures} == {("a/x.JPEG", "unsafe-output"),
                                                            ("b/x.JPEG", "unsafe-output")}
    assert (dst / "b" / "x.JPEG").is_symlink() and report.written == 1


def test_a_fifo_or_an_unencodable_image_is_a_reported_failure(tmp_path):
    src = _small_tree(tmp_path / "src")
    os.mkfifo(src / "a" / "pipe.JPEG")  # reading it would wait for a writer forever
    result = run_cli("resize", src, tmp_path / "dst", "--resize", "shorter:256", "--max-aspect", "0",
                     "--jobs", "1", check=False, timeout=60)
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr
    failures = sorted(line.split("\t")[:2] for line in (tmp_path / "dst" / FAILURES).read_text().splitlines())
    assert failures == [["a/pipe.JPEG", "not-a-file"], ["b/strip.JPEG", "too-large"]]
    assert (tmp_path / "dst" / "a" / "x.JPEG").is_file() and (tmp_path / "dst" / "b" / "x.JPEG").is_file()


def test_max_aspect_caps_resize_outputs_and_is_part_of_its_options(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (500, 33), (1, 2, 3)).save(src / "wide.JPEG")
    run_cli("resize", src, tmp_path / "dst", "--resize", "shorter:256")
    with Image.open(tmp_path / "dst" / "wide.JPEG") as img:
        assert img.size == (1024, 256)
    assert_clean_error(run_cli("resize", src, tmp_path / "dst", "--resize", "shorter:256", "--max-aspect", "8",
                               check=False), "--overwrite")
    assert_clean_error(run_cli("resize", src, tmp_path / "d2", "--max-aspect", "0.5", check=False), "--max-aspect")


def test_a_corrupt_exif_warning_names_the_file(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    exif = Image.Exif()
    exif[0x010F] = "a maker name long enough to live outside the IFD"
    buf = io.BytesIO()
    Image.new("RGB", (40, 30)).save(buf, "JPEG", exif=exif.tobytes())
    data = bytearray(buf.getvalue())
    at = data.find(b"Exif\x00\x00MM") + 6
    data[at + 8:at + 10] = b"\x00\xff"  # the IFD claims 255 entries; the block holds one
    (src / "odd.JPEG").write_bytes(bytes(data))
    result = run_cli("resize", src, tmp_path / "dst", "--resize", "shorter:16", "--jobs", "1")
    assert f"warning: {src / 'odd.JPEG'}: Corrupt EXIF data" in result.stderr, result.stderr
    assert "imageops.py" not in result.stderr and "ImageWarning" not in result.stderr  # no source line


def test_a_symlink_loop_in_src_is_walked_once(tmp_path):
    src = _small_tree(tmp_path / "src")
    (src / "a" / "loop").symlink_to(src)
    assert walk_images(src) == (["a/x.JPEG", "b/strip.JPEG", "b/x.JPEG"], 0)


@pytest.mark.parametrize("kind", ["bind mount", "symbolic link"])
def test_dst_inside_src_under_another_name_is_refused(tmp_path, kind):
    src = _small_tree(tmp_path / "src")
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    with folder_alias(src, tmp_path / "alias", kind) as alias:
        assert_clean_error(run_cli("resize", src, alias / "out", check=False), "lies inside the source")
        assert_clean_error(run_cli("resize", alias, src, check=False), "is the source")
    (tmp_path / "outer").mkdir()
    (tmp_path / "outer" / "src").symlink_to(src)
    assert_clean_error(run_cli("resize", tmp_path / "outer" / "src", tmp_path, check=False), "holds the source")
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before


def test_a_src_without_images_is_an_error_not_an_empty_success(tmp_path):
    (tmp_path / "src" / "docs").mkdir(parents=True)
    (tmp_path / "src" / "docs" / "README.txt").write_text("no images here")
    assert_clean_error(run_cli("resize", tmp_path / "src", tmp_path / "dst", check=False),
                       f"SRC {tmp_path / 'src'} holds no images (1 other file);")
    assert not (tmp_path / "dst").exists()
