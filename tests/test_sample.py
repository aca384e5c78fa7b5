from pathlib import Path

from conftest import assert_clean_error, run_cli
from imgprep.prepare.sample import make_sample


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.JPEG"))}


def test_same_seed_same_tree_and_grain_makes_imagenet_sized_files(tmp_path):
    for name, grain in (("a", 0.0), ("b", 0.0), ("grainy", 8.0), ("grainy2", 8.0)):
        make_sample(tmp_path / name, classes=3, train_per_class=4, val_per_class=1, seed=5, grain=grain)
    plain, grainy = tree_bytes(tmp_path / "a"), tree_bytes(tmp_path / "grainy")
    assert plain == tree_bytes(tmp_path / "b") and grainy == tree_bytes(tmp_path / "grainy2")
    assert plain.keys() == grainy.keys() and len(plain) == 15
    mean_kb = [sum(map(len, files.values())) / len(files) / 1024 for files in (plain, grainy)]
    # smooth upscaled crops (~50 KB); with grain, much larger (~100 KB over a few hundred files)
    assert mean_kb[0] < 75 and mean_kb[1] > 1.4 * mean_kb[0], mean_kb


def test_grain_out_of_range_is_a_clean_error(tmp_path):
    assert_clean_error(run_cli("sample", tmp_path / "s", "--grain", "-1", check=False), "--grain")
