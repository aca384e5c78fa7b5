"""The `imgprep` command as a newcomer meets it: every command and option explained, with its default;
bad usage exits 2 naming the option; a forgotten OUT is named; counts read in the right number."""

import json
import os

import click
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import run_cli
from imgprep.cli import _policy_names, _rerun_hint, main
from imgprep.formats.manifest import MANIFEST, finish_hint, read_manifest
from imgprep.prepare.make_lists import ListsReport
from imgprep.prepare.progress import plural


def commands():
    return sorted(main.commands.items())


def help_records(name, command):
    """(option, help text as --help shows it) for each of the command's options."""
    parent = click.Context(main, info_name="imgprep", **main.context_settings)
    ctx = click.Context(command, parent=parent, info_name=name)
    return [(param, param.get_help_record(ctx)) for param in command.get_params(ctx) if isinstance(param, click.Option)]


@pytest.mark.parametrize("name, command", commands())
def test_every_command_has_a_summary_what_it_reads_and_writes_and_an_example(name, command):
    text = command.help or ""
    summary = text.strip().splitlines()[0]
    assert summary and len(summary) <= 100, (name, summary)
    assert "Reads" in text and "writes" in text.lower(), name
    assert "Example" in text, name


@pytest.mark.parametrize("name, command", commands())
def test_every_option_has_help_and_shows_its_default(name, command):
    for param, (spec, text) in help_records(name, command):
        assert param.help and param.help.strip(), (name, spec)
        if not param.is_flag:  # a flag's default is off
            assert "[default: " in text, (name, spec, text)
        assert "[default: (" not in text, (name, spec, text)  # Click's parentheses around a default in words


def help_of(*args):
    result = CliRunner().invoke(main, [*args, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def option_line(text, option):
    """The help of one option, from its name up to the next option (a run of whitespace-joined text)."""
    start = text.index(option + " ")
    end = text.find(" --", start + len(option))
    return text[start:end if end > 0 else None]


def test_each_command_describes_its_own_workers():
    for command in ("resize", "build-lmdb"):
        assert "compute-mean" not in option_line(help_of(command), "--jobs"), command
    assert "threads" in option_line(help_of("compute-mean"), "--jobs")
    assert "ROOT" not in option_line(help_of("compute-mean"), "--scheduler")
    assert "ROOT" in option_line(help_of("build-lmdb"), "--scheduler")


def test_build_lmdb_says_what_no_preset_and_no_resize_store():
    assert "without one, none: originals stored unresized" in option_line(help_of("build-lmdb"), "--resize")


@pytest.fixture
def paths(tmp_path):
    """Existing paths for commands whose arguments must exist, so that only the option is wrong."""
    folder = tmp_path / "folder"
    folder.mkdir()
    listed = tmp_path / "list.txt"
    listed.write_text("a.JPEG 0\n")
    return folder, listed


@pytest.mark.parametrize("args, option", [
    (["resize", "{folder}", "{out}", "--resize", "shorter:abc"], "--resize"),
    (["build-lmdb", "{list}", "{folder}", "{out}", "--resize", "shorter:abc"], "--resize"),
    (["compute-mean", "{folder}", "{out}.binaryproto", "--resize", "squash:0"], "--resize"),
    (["build-lmdb", "{list}", "{folder}", "{out}", "--max-aspect", "0.5"], "--max-aspect"),
    (["resize", "{folder}", "{out}", "-j", "-1"], "--jobs"),
    (["bench-loader", "{folder}", "--policy", "caffe,nope"], "--policy"),
    (["preview", "{folder}", "{out}.png", "--policy", "nope"], "--policy"),
    (["sample", "{out}", "--grain", "-1"], "--grain"),
    (["sample", "{out}", "--classes", "0"], "--classes"),
])
def test_a_bad_option_value_is_bad_usage_exit_2_naming_the_option(paths, tmp_path, args, option):
    folder, listed = paths
    args = [a.format(folder=folder, list=listed, out=tmp_path / "out") for a in args]
    result = run_cli(*args, check=False)
    assert result.returncode == 2, result.stderr
    assert f"Invalid value for '{option}'" in result.stderr or f"'{option}'" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_compute_mean_with_out_forgotten_says_out_is_missing(paths):
    folder, _ = paths
    for args in (["compute-mean", folder], ["compute-mean", folder, folder], ["compute-mean"]):
        result = run_cli(*args, check=False)
        assert result.returncode == 2, result.stderr
        assert "compute-mean needs DB... and OUT: the .binaryproto to write" in result.stderr, result.stderr
        assert "Missing argument 'DB...'" not in result.stderr
    assert f"{folder} is a folder" in run_cli("compute-mean", folder, check=False).stderr


def test_policy_all_is_every_policy_training_ones_first():
    assert _policy_names("all") == ["caffe", "resnet", "inception", "center", "ten-crop"]
    assert _policy_names(" resnet, center ") == ["resnet", "center"]


def test_counts_read_in_the_right_number():
    assert plural(1, "failure") == "1 failure"
    assert plural(0, "failure") == "0 failures"
    assert plural(1281167, "image") == "1,281,167 images"
    assert plural(2, "class", "classes") == "2 classes"
    assert "train.txt (1 line)" in ListsReport({"train.txt": 1}).summary("lists")
    assert "skipped 1 non-image file" in ListsReport({"train.txt": 2}, skipped_files=1).summary("lists")


def write_jpeg(path, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 60, 30)).save(path, "JPEG")


def test_resize_reports_one_failure_by_reason_and_then_that_nothing_is_to_do(tmp_path):
    src = tmp_path / "src"
    write_jpeg(src / "a" / "good.JPEG")
    (src / "a" / "empty.JPEG").write_bytes(b"")
    first = run_cli("resize", src, tmp_path / "dst", "-j", "1", check=False)
    assert first.returncode == 3, first.stderr
    assert "1 failure of 2 images" in first.stderr and "failures by reason: empty 1" in first.stderr, first.stderr
    (src / "a" / "empty.JPEG").unlink()
    second = run_cli("resize", src, tmp_path / "dst", "-j", "1")
    assert "nothing to do: 1 output up to date" in second.stderr, second.stderr
    assert "img/s" not in second.stderr


def test_sample_shows_progress_with_count_rate_and_eta(tmp_path):
    env = dict(os.environ, IMGPREP_PROGRESS_INTERVAL="0")
    result = run_cli("sample", tmp_path / "s", "--classes", "2", "--train-per-class", "3", "--val-per-class", "1",
                     env=env)
    lines = result.stderr.splitlines()
    assert any(line.startswith("sample: 3/8 (37.5%)") and "img/s" in line and "ETA" in line for line in lines), lines
    assert lines[-1].startswith("sample: 6 train images (0 oddities) and 2 val images in 2 classes"), lines


def test_a_stopped_build_or_merge_is_continued_as_its_manifest_says(sample_tree, tmp_path):
    out = tmp_path / "db"
    run_cli("build-lmdb", sample_tree.lists / "val.txt", sample_tree.root / "val", out, "-j", "1")
    assert _rerun_hint("build-lmdb", {"out": out}) == "Run the same command again."  # complete: nothing to finish
    manifest = json.loads((out / MANIFEST).read_text())
    for state, merged in (("building", False), ("building", True), ("partial", True)):
        changed = dict(manifest, state=state, **({"merged_from": ["p0", "p1"]} if merged else {}))
        (out / MANIFEST).write_text(json.dumps(changed))
        hint = finish_hint(read_manifest(out))
        assert _rerun_hint("merge" if merged else "build-lmdb", {"out": out}) == hint[0].upper() + hint[1:] + "."
    assert _rerun_hint("compute-mean", {}) == "Nothing was written: run the same command again."


def test_the_top_level_help_and_version():
    assert "Run `imgprep COMMAND --help`" in help_of()
    result = run_cli("--version")
    assert result.stdout.startswith("imgprep "), result.stdout
