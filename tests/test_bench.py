import json

from conftest import assert_clean_error, run_cli
from imgprep.build import BuildOptions, build_database
from imgprep.imageops import ImageSpec, parse_resize


def test_bench_loader_runs_on_cpu_with_its_peers(sample_tree, tmp_path):
    options = BuildOptions(jobs=2, shuffle=True, spec=ImageSpec(parse_resize("shorter:256"), encoded=True))
    build_database(sample_tree.lists / "val.txt", sample_tree.root / "val", tmp_path / "db", options,
                   show_progress=False)
    result = run_cli("bench-loader", tmp_path / "db", "--batch", "8", "--seconds", "0.5", "--threads", "2",
                     "--compare", sample_tree.root / "val", "--compare-list", sample_tree.lists / "val.txt",
                     "--torch-workers", "0", "--json")
    rows = json.loads(result.stdout)
    names = [row["source"] for row in rows]
    assert names[0] == "imgprep loader (training policy, cpu)" and rows[0]["images_per_s"] > 0
    assert "same LMDB, read + decode only" in names
    assert any(name.startswith("DALI file reader") and row["images_per_s"] > 0 for name, row in zip(names, rows))
    assert any(name.startswith("torchvision") for name in names)  # measured, or noted as not installed
    table = run_cli("bench-loader", tmp_path / "db", "--batch", "8", "--seconds", "0.3", "--eval",
                    "--cpu-share", "0.4").stdout
    assert "| imgprep loader (eval policy, cpu) |" in table
    assert "| imgprep loader, 40% of records decoded on CPU threads |" in table


def test_bench_loader_on_a_non_database_is_a_clear_error(tmp_path):
    assert_clean_error(run_cli("bench-loader", tmp_path, check=False), "neither an LMDB")
