from imgprep.demo import run_demo


def test_demo_runs_every_stage(tmp_path, capsys):
    run_demo(tmp_path / "demo", seconds=0.3)
    out = capsys.readouterr().out
    for made in ("train_lmdb", "val_lmdb", "train_caffe_leveldb", "imagenet_mean.binaryproto", "mean224.binaryproto"):
        assert (tmp_path / "demo" / made).exists(), made
    assert "imgprep loader (training policy, cpu)" in out and "demo: done" in out
