import os

from conftest import assert_clean_error, run_cli
from imgprep.demo import MARKER, prepare_workdir, run_demo


def test_demo_runs_every_stage(tmp_path, capsys):
    run_demo(tmp_path / "demo", seconds=0.3)
    out = capsys.readouterr().out
    for made in ("train_lmdb", "val_lmdb", "train_caffe_leveldb", "imagenet_mean.binaryproto", "mean224.binaryproto"):
        assert (tmp_path / "demo" / made).exists(), made
    assert "imgprep loader (training policy, cpu)" in out and "demo: done" in out
    assert (tmp_path / "demo" / MARKER).is_file()


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    mine = tmp_path / "work"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert_clean_error(run_cli("demo", mine, check=False), "not an earlier demo's folder")
    assert (mine / "thesis.tex").read_text() == "years of work"
    (tmp_path / "file").write_text("x")
    assert_clean_error(run_cli("demo", tmp_path / "file", check=False), "is a file")
    (tmp_path / "link").symlink_to(tmp_path / "empty", target_is_directory=True)
    (tmp_path / "empty").mkdir()
    assert_clean_error(run_cli("demo", tmp_path / "link", check=False), "symbolic link")


def test_an_earlier_demos_folder_is_emptied_and_marked(tmp_path):
    earlier = tmp_path / "demo"
    prepare_workdir(earlier)  # a new folder
    assert os.listdir(earlier) == [MARKER]
    (earlier / "train_lmdb").mkdir()
    (earlier / "train_lmdb" / "data.mdb").write_bytes(b"x")
    prepare_workdir(earlier)
    assert os.listdir(earlier) == [MARKER]
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_workdir(empty)
    assert os.listdir(empty) == [MARKER]
