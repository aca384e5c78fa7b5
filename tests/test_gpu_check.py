"""scripts/gpu-check.sh: its rehearsal on a CPU runs every step and command line of every tier, budgets
skip what would not fit, and scripts/pack_dali.py's pruning keeps exactly one GPU architecture's code."""

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402
import pack_dali  # noqa: E402


def check(*args, **kwargs):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    env.pop("OUT", None)
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), *map(str, args)], capture_output=True,
                          text=True, env=env, **kwargs)


def test_the_dry_run_runs_every_step_of_every_tier_and_writes_the_summary(tmp_path):
    """The same command lines as on the GPU, with tiny sizes in DALI's CPU mode: every step ran and passed,
    and OUT holds what a device call brings back."""
    pytest.importorskip("torch")
    out, work = tmp_path / "out", tmp_path / "work"
    result = check("--dry-run", "--out", out, "--work", work, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "report.md", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["plan"]["dry_run"] is True
    ran = [(s["tier"], s["name"]) for s in summary["steps"]]
    assert ran == [(st.tier, st.name) for st in gpu_check.STEPS]
    for entry in summary["steps"]:
        assert entry["status"] == "passed", entry
        assert entry["commands"] or entry["name"] == "data" and entry["figures"]["reused"], entry
    assert {t: (f["passed"], f["failed"], f["skipped"]) for t, f in summary["tiers"].items()} == {
        "1": (4, 0, 0), "2": (7, 0, 0), "3": (4, 0, 0)}
    steps = {(s["tier"], s["name"]): s for s in summary["steps"]}
    assert steps[(3, "data")]["figures"]["reused"] and not steps[(2, "data")]["figures"]["reused"]
    assert steps[(1, "contract-tests")]["figures"]["counts"]["passed"] >= 3
    assert len(steps[(1, "gpu-graph-smoke")]["figures"]["rows"]) == 7  # five policies, decode only, CaffeDataset
    example = steps[(3, "example")]["figures"]
    assert example["steps"] == gpu_check.DRY.example_steps and len(example["epochs"]) == 2  # past one epoch
    assert "PIL" in steps[(3, "build-cores")]["figures"] and steps[(3, "build-cores")]["figures"]["tables"]
    report = (out / "report.md").read_text()
    assert all(f"## tier {t}, {n}: passed" in report for t, n in ran)
    assert "$ python -m imgprep bench-loader" in (out / "log.txt").read_text()


def test_steps_that_would_not_fit_the_budget_are_skipped_and_recorded(tmp_path):
    result = check("--dry-run", "--tier", 2, "--budget", 0, "--out", tmp_path / "out", "--work", tmp_path / "work",
                   timeout=60)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [s["name"] for s in summary["steps"]] == [st.name for st in gpu_check.STEPS if st.tier == 2]
    assert all(s["status"].startswith("skipped: would not fit") for s in summary["steps"])
    assert summary["tiers"]["2"]["skipped"] == 7


def test_folders_holding_other_files_are_refused(tmp_path):
    mine = tmp_path / "out" / "notes.txt"
    mine.parent.mkdir()
    mine.write_text("mine")
    result = check("--dry-run", "--tier", 1, "--budget", 0, "--out", mine.parent, "--work", tmp_path / "work",
                   timeout=60)
    assert result.returncode != 0 and "not the check's own" in result.stderr and "Traceback" not in result.stderr
    assert mine.read_text() == "mine" and sorted(p.name for p in mine.parent.iterdir()) == ["notes.txt"]


def fatbin(images):
    """A fatbin of (kind, arch, payload) images, in the layout the CUDA runtime registers."""
    body = b""
    for kind, arch, payload in images:
        header = struct.pack("<HHIQIIHHI", kind, 0x101, 64, len(payload), 0, 0, 0, 0, arch).ljust(64, b"\0")
        body += header + payload
    return struct.pack("<IHHQ", pack_dali.FATBIN_MAGIC, 1, 16, len(body)) + body


def elf_with(sections: dict[str, bytes]) -> bytes:
    """A minimal 64-bit ELF file holding `sections` (name -> bytes)."""
    names = b"\0" + b"".join(n.encode() + b"\0" for n in [*sections, ".shstrtab"])
    blobs, offset = [], 64
    for name, content in [*sections.items(), (".shstrtab", names)]:
        blobs.append((names.index(name.encode() + b"\0"), offset, content))
        offset += len(content)
    headers = bytes(64) + b"".join(struct.pack("<IIQQQQIIQQ", name, 1, 0, 0, start, len(content), 0, 0, 1, 0)
                                   for name, start, content in blobs)
    ident = b"\x7fELF\x02\x01\x01".ljust(16, b"\0")
    head = ident + struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 0, offset, 0, 64, 0, 0, 64, len(blobs) + 1, len(blobs))
    return head + b"".join(content for _, _, content in blobs) + headers


def test_pruning_keeps_the_chosen_architectures_machine_code_in_place(tmp_path):
    sm80, sm90, ptx = b"\x11" * 100, b"\x22" * 60, b"\x33" * 40
    lib = tmp_path / "lib.so"
    lib.write_bytes(elf_with({".text": b"\x90" * 32, ".nv_fatbin": fatbin([(2, 80, sm80), (2, 90, sm90), (1, 120, ptx)])
                              + bytes(8) + fatbin([(2, 90, sm90), (2, 100, sm80)])}))
    before = lib.read_bytes()
    zeroed, kept = pack_dali.keep_only_sm(lib, 90)
    after = lib.read_bytes()
    assert (zeroed, kept) == (100 + 40 + 100, 2 * 60) and len(after) == len(before)
    assert after.count(sm90) == 2 and b"\x11" * 10 not in after and b"\x33" * 10 not in after
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
    assert len(changed) == zeroed  # the payloads only: headers, other sections and the layout stay
    with pytest.raises(SystemExit, match="no sm_75 code"):
        pack_dali.keep_only_sm(lib, 75)


def test_the_fatbin_reader_walks_dalis_own_libraries_to_their_end():
    """The layout the pruning relies on, read off the installed DALI: every image accounted for, and
    machine code for sm_90 beside every other architecture's."""
    dali = pytest.importorskip("nvidia.dali")
    lib = Path(dali.__file__).parent / "libdali_kernels.so"
    data = lib.read_bytes()
    sections = pack_dali.elf_sections(data)
    images = list(pack_dali.fatbin_images(data, *sections[".nv_fatbin"]))
    machine_code = [arch for kind, arch, _, _ in images if kind == pack_dali.ELF_IMAGE]
    assert machine_code.count(90) > 0 and all(machine_code.count(a) == machine_code.count(90) for a in machine_code)


def test_pack_keeps_what_the_loader_loads_and_leaves_out_the_rest():
    keep = pack_dali.WHEELS["nvidia-nvimgcodec-cu12==0.9.0.20"]
    assert pack_dali.wanted("nvidia/nvimgcodec/extensions/libnvjpeg_ext.so.0.9.0", keep, "312")
    assert not pack_dali.wanted("nvidia/nvimgcodec/extensions/libopencv_ext.so.0.9.0", keep, "312")
    assert pack_dali.wanted("nvidia/dali/backend_impl.cpython-312-x86_64-linux-gnu.so", None, "312")
    assert not pack_dali.wanted("nvidia/dali/backend_impl.cpython-311-x86_64-linux-gnu.so", None, "312")
    assert not pack_dali.wanted("nvidia/dali/include/dali/core/common.h", None, "312")
    assert not any(name.startswith(("nvidia-libnvcomp", "libcst", "nvtx", "makefun")) for name in pack_dali.WHEELS)


def test_each_tier_fits_its_budget_and_the_plan_fits_13_minutes():
    for tier, budget in gpu_check.TIER_BUDGETS.items():
        # tier 3 reuses tier 2's data (made again only on a machine that went back in between)
        planned = [1 if (st.tier, st.name) == (3, "data") else st.estimate for st in gpu_check.STEPS if st.tier == tier]
        assert sum(planned) <= budget, tier
    total = sum(gpu_check.TIER_BUDGETS.values()) + sum(gpu_check.PLAN_OVERHEAD.values())
    assert total <= gpu_check.PLAN_LIMIT
    header = (ROOT / "scripts" / "gpu-check.sh").read_text()
    assert re.search(r"^#   total +(\d+) s", header, re.M).group(1) == str(total)  # the header adds up the same


def test_the_packs_nvidia_package_imports_beside_the_machines_own(tmp_path):
    """The pack's nvidia.dali comes first on the path; the nvidia.* packages installed on the machine (torch's
    and JAX's CUDA libraries), regular packages or namespace ones, still import."""
    site, regular, namespace = tmp_path / "site", tmp_path / "regular", tmp_path / "namespace"
    (site / "nvidia" / "dali").mkdir(parents=True)
    (site / "nvidia" / "__init__.py").write_text(pack_dali.NVIDIA_INIT)
    (site / "nvidia" / "dali" / "__init__.py").write_text("WHERE = 'pack'\n")
    (regular / "nvidia" / "dali").mkdir(parents=True)
    (regular / "nvidia" / "__init__.py").write_text("")
    (regular / "nvidia" / "dali" / "__init__.py").write_text("WHERE = 'machine'\n")
    (regular / "nvidia" / "cublas").mkdir()
    (regular / "nvidia" / "cublas" / "__init__.py").write_text("")
    (namespace / "nvidia" / "cu13").mkdir(parents=True)
    (namespace / "nvidia" / "cu13" / "__init__.py").write_text("")
    code = "import nvidia.dali, nvidia.cublas, nvidia.cu13; print(nvidia.dali.WHERE)"
    for order in ([site, regular, namespace], [site, namespace, regular]):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, order)))
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        assert result.stdout.strip() == "pack", result.stderr
