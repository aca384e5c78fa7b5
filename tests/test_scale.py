"""Memory stays flat with scale: list parsing per line, and the writer's peak RSS per record."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
from scale_fixtures import make_pool_tree, measure, write_long_list  # noqa: E402


def test_million_line_list_parses_in_bounded_memory(tmp_path):
    small = measure("parse", list=write_long_list(tmp_path / "small.txt", 100_000))
    big = measure("parse", list=write_long_list(tmp_path / "big.txt", 1_000_000))
    assert big["n"] == 1_000_000
    per_line = (big["peak_rss_mb"] - small["peak_rss_mb"]) * 2**20 / 900_000
    assert per_line < 250, f"{per_line:.0f} bytes per list line"  # 1.28M lines -> ~300 MB at most


def test_writer_memory_does_not_grow_with_records(tmp_path):
    list_small = make_pool_tree(tmp_path / "tree", 3_000)
    list_big = make_pool_tree(tmp_path / "tree", 30_000)
    small = measure("build", list=list_small, root=tmp_path / "tree", out=tmp_path / "db_small", jobs=2)
    big = measure("build", list=list_big, root=tmp_path / "tree", out=tmp_path / "db_big", jobs=2)
    assert (small["n"], big["n"]) == (3_000, 30_000)
    # 10x the records: only the list itself (~150 B/entry) may add memory, not the records (768 B each)
    assert big["peak_rss_mb"] - small["peak_rss_mb"] < 25, (small, big)
