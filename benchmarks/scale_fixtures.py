"""Scale fixtures shared by the scale test and benchmark: big lists over a small pool of files,
and a child process that reports its own peak RSS."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

POOL = 50


def make_pool_tree(root: Path, entries: int) -> Path:
    """ROOT/pool/ holds POOL small JPEGs; ROOT/e/<k>/<i>.JPEG are `entries` symlinks to them (inside
    ROOT, so allowed); returns the list file."""
    pool = root / "pool"
    pool.mkdir(parents=True, exist_ok=True)
    for i in range(POOL):
        buf = io.BytesIO()
        Image.new("RGB", (48, 40), (i * 5 % 256, 80, 160)).save(buf, "JPEG", quality=90)
        (pool / f"{i}.JPEG").write_bytes(buf.getvalue())
    lines = []
    for i in range(entries):
        rel = f"e/{i // 1000}/{i}.JPEG"
        link = root / rel
        if not link.parent.exists():
            link.parent.mkdir(parents=True)
        if not os.path.lexists(link):
            os.symlink((pool / f"{i % POOL}.JPEG").resolve(), link)
        lines.append(f"{rel} {i % 1000}\n")
    list_file = root / f"list{entries}.txt"
    list_file.write_text("".join(lines))
    return list_file


def write_long_list(path: Path, lines: int) -> Path:
    with open(path, "w") as f:
        for i in range(lines):
            f.write(f"n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG {i % 1000}\n")
    return path


_CHILD = """
import json, resource, sys, time
kind, args = sys.argv[1], json.loads(sys.argv[2])
start = time.perf_counter()
if kind == "parse":
    from imgprep.formats.lists import read_list
    n = len(read_list(args["list"]))
else:
    from imgprep.prepare.build import BuildOptions, build_database
    from imgprep.formats.imageops import ImageSpec
    from imgprep.formats.resizing import parse_resize
    spec = ImageSpec(parse_resize("squash:16x16"), encoded=False)
    n = build_database(args["list"], args["root"], args["out"], BuildOptions(spec=spec, jobs=args["jobs"]),
                       overwrite=True, show_progress=False).records
status = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith(("RssAnon", "RssFile")))
print(json.dumps({"n": n, "seconds": time.perf_counter() - start,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "anon_mb": int(status["RssAnon"].split()[0]) / 1024, "file_mb": int(status["RssFile"].split()[0]) / 1024}))
"""


def measure(kind: str, **args) -> dict:
    """Runs a list parse or a build in a fresh process; returns its count, seconds and peak RSS."""
    out = subprocess.run([sys.executable, "-c", _CHILD, kind, json.dumps({k: str(v) if isinstance(v, Path) else v
                                                                          for k, v in args.items()})],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)
