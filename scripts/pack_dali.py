"""Packs DALI and the packages imgprep needs beside it for a GPU machine without network, in as few
parts as the device's carry limit allows: DEST/p0/part, DEST/p1/part, ... (xz-compressed tar of a
site folder `site/`, split). Unpack there with

    cat /tmp/parts/p? | xz -d | tar x -C /tmp/dali      then   PYTHONPATH=/tmp/dali/site:.

    python3 scripts/pack_dali.py .gpu/dali [--sm 90] [--python 3.12] [--part-mib 56] [--wheels .gpu/wheels]

What is kept is what imgprep's pipelines load (measured in DALI's CPU mode with only these files
on the path, and read off the libraries' ELF dependencies for the GPU): DALI 2.4.0 (CUDA 12 build)
with its bundled libraries, nvImageCodec's library with its two JPEG extensions (nvJPEG on the
GPU, libjpeg-turbo on the CPU), nvJPEG, and the Python packages DALI imports (optree, gast,
astunparse, six) plus imgprep's own that the GPU machine may lack (lmdb, plyvel, click, joblib).
Left out: other Pythons' extension modules, headers, nvCOMP (never loaded), the JPEG 2000, TIFF,
BMP, PNM and OpenCV codec extensions (imgprep's records and samples are JPEG), libcst, nvtx and
makefun (DALI's dynamic mode only), nvImageCodec's Python module.

`--sm 90` also zeroes, inside DALI's libraries, the GPU code built for other GPUs (the fatbin
images for sm_50 ... sm_120 and the sm_120 PTX), keeping the sm_90 (Hopper: H100, H200) machine
code in place: the files keep their size and layout, the zeroes compress to nothing, and the pack
shrinks from 232 MiB (5 parts) to 71 MiB (2 parts). Such a pack runs only on sm_90 GPUs.

nvidia/__init__.py extends its path to every nvidia/ folder on sys.path: a plain one (nvImageCodec's
wheel ships one) would hide the machine's own nvidia.* packages (where JAX's CUDA plugin finds CUDA's libraries).

Wheels are downloaded once into --wheels (pip download, pinned versions) and reused.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# requirement -> the wheel members kept (fnmatch patterns; None: all). {py} is the CPython tag.
WHEELS = {
    "nvidia-dali-cuda120==2.4.0": None,
    "nvidia-nvimgcodec-cu12==0.9.0.20": ["nvidia/nvimgcodec/libnvimgcodec.so.0",
                                         "nvidia/nvimgcodec/extensions/libnvjpeg_ext.so.*",
                                         "nvidia/nvimgcodec/extensions/libjpeg_turbo_ext.so.*",
                                         "*.dist-info/*"],
    "nvidia-nvjpeg-cu12==12.4.0.76": ["nvidia/nvjpeg/lib/libnvjpeg.so.12", "*.dist-info/*"],
    "optree==0.20.0": None, "gast==0.7.0": None, "astunparse==1.6.3": None, "six==1.17.0": None,
    "lmdb==3.0.0": None, "plyvel==1.5.1": None, "click==8.5.1": None, "joblib==1.6.0": None,
}
DROPPED = ["nvidia/dali/include/*", "*/__pycache__/*", "nvidia/__init__.py"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
# nvidia/ must stay one package with the CUDA libraries' nvidia.* installed elsewhere (torch's, JAX's):
# a regular package that extends its path to every nvidia/ folder on sys.path, whether those hold an
# __init__.py or not.
NVIDIA_INIT = ('"""nvidia.dali from this folder, beside the nvidia.* packages installed elsewhere on sys.path."""\n'
               "from pkgutil import extend_path\n\n__path__ = extend_path(__path__, __name__)\n")
FATBIN_MAGIC = 0xBA55ED50
ELF_IMAGE = 2


def wanted(name: str, keep: list[str] | None, py: str) -> bool:
    """Whether a wheel member goes into the site."""
    if any(fnmatch.fnmatch(name, pattern) for pattern in DROPPED):
        return False
    if ".cpython-3" in name and f".cpython-{py}-" not in name:
        return False  # another Python's extension module
    return keep is None or any(fnmatch.fnmatch(name, pattern) for pattern in keep)


def download(wheels: Path, py: str) -> dict[str, Path]:
    """{requirement: wheel file}, downloading the ones not in `wheels` yet."""
    wheels.mkdir(parents=True, exist_ok=True)
    found = {}
    for requirement in WHEELS:
        name, version = requirement.split("==")
        stem = f"{name.replace('-', '_')}-{version}-"
        matches = [p for p in wheels.glob(f"{stem}*.whl") if f"cp{py}" in p.name or "-none-" in p.name]
        if not matches:
            platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            "--python-version", py[0] + "." + py[1:], "--implementation", "cp", *platforms,
                            "-d", str(wheels), requirement], check=True)
            matches = [p for p in wheels.glob(f"{stem}*.whl") if f"cp{py}" in p.name or "-none-" in p.name]
        found[requirement] = matches[0]
    return found


def elf_sections(data: bytes) -> dict[str, tuple[int, int]]:
    """{section name: (file offset, size)} of a 64-bit little-endian ELF file."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return {}
    shoff, = struct.unpack_from("<Q", data, 0x28)
    entsize, count, names_index = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * entsize) for i in range(count)]
    names = headers[names_index][4]
    out = {}
    for header in headers:
        start = names + header[0]
        out[data[start:data.index(b"\0", start)].decode()] = (header[4], header[5])
    return out


def fatbin_images(data: bytes, offset: int, size: int):
    """(kind, arch, payload offset, payload size) of every image in the fatbins of a section; raises
    ValueError where the layout is not the one known (nothing is changed then)."""
    end = offset + size
    while offset < end:
        magic, _, header_size, body = struct.unpack_from("<IHHQ", data, offset)
        if magic != FATBIN_MAGIC:
            if data[offset:min(end, offset + 8)].strip(b"\0"):
                raise ValueError(f"unknown bytes at {offset:#x}")
            offset += 8  # padding between fatbins
            continue
        image, stop = offset + header_size, offset + header_size + body
        while image < stop:
            kind, _, image_header, payload = struct.unpack_from("<HHIQ", data, image)
            arch, = struct.unpack_from("<I", data, image + 28)
            yield kind, arch, image + image_header, payload
            image += image_header + payload
        if image != stop:
            raise ValueError(f"fatbin at {offset:#x} does not end where its header says")
        offset = stop


def keep_only_sm(path: Path, sm: int) -> tuple[int, int]:
    """Zeroes the GPU images of `path` other than sm_`sm` machine code; (bytes zeroed, bytes kept)."""
    data = bytearray(path.read_bytes())
    sections = elf_sections(data)
    spans, kept = [], 0
    for name in (".nv_fatbin", "__nv_relfatbin"):
        if name in sections:
            images = list(fatbin_images(data, *sections[name]))
            if not any(kind == ELF_IMAGE and arch == sm for kind, arch, _, _ in images):
                raise SystemExit(f"{path}: {name} holds no sm_{sm} code; not packing it for sm_{sm}")
            for kind, arch, start, size in images:
                if kind == ELF_IMAGE and arch == sm:
                    kept += size
                else:
                    spans.append((start, size))
    for start, size in spans:
        data[start:start + size] = bytes(size)
    if spans:
        path.write_bytes(data)
    return sum(size for _, size in spans), kept


def make_site(site: Path, wheels: dict[str, Path], py: str, sm: int | None) -> dict:
    """Extracts the kept members into `site`; returns what was kept and zeroed."""
    report = {"packages": {}, "zeroed_mib": 0.0, "sm": sm}
    for requirement, wheel in wheels.items():
        keep = WHEELS[requirement]
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.infolist() if not m.is_dir() and wanted(m.filename, keep, py)]
            for member in members:
                archive.extract(member, site)
                mode = member.external_attr >> 16
                if mode:
                    (site / member.filename).chmod(mode & 0o777)
        report["packages"][requirement] = round(sum(m.file_size for m in members) / 2**20, 1)
    (site / "nvidia" / "__init__.py").write_text(NVIDIA_INIT)
    if sm:
        for lib in sorted((site / "nvidia" / "dali").rglob("*.so*")):
            if lib.stat().st_size > 4 * 2**20:
                zeroed, _ = keep_only_sm(lib, sm)
                report["zeroed_mib"] += round(zeroed / 2**20, 1)
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="folder for p0/part, p1/part, ... (replaced)")
    parser.add_argument("--sm", type=int, default=None, help="keep only this GPU architecture's code (90: H100/H200)")
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python (extension modules)")
    parser.add_argument("--part-mib", type=int, default=56, help="largest part (a part and the tree travel together)")
    parser.add_argument("--wheels", type=Path, default=Path(".gpu/wheels"), help="wheel cache")
    parser.add_argument("--site", type=Path, default=None, help="also keep the unpacked site here (for checks)")
    args = parser.parse_args()
    py = args.python.replace(".", "")
    wheels = download(args.wheels, py)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        report = make_site(work / "site", wheels, py, args.sm)
        unpacked = sum(f.stat().st_size for f in (work / "site").rglob("*") if f.is_file())
        print(f"site: {unpacked / 2**20:.0f} MiB unpacked; packing ...", file=sys.stderr, flush=True)
        archive = work / "site.tar.xz"
        with archive.open("wb") as out:
            tar = subprocess.Popen(["tar", "cf", "-", "-C", str(work), "site"], stdout=subprocess.PIPE)
            subprocess.run(["xz", "-T0", "-6"], stdin=tar.stdout, stdout=out, check=True)
            if tar.wait():
                raise SystemExit("tar failed")
        if args.site:
            shutil.rmtree(args.site, ignore_errors=True)
            shutil.copytree(work / "site", args.site, symlinks=True)
        shutil.rmtree(args.dest, ignore_errors=True)
        part_size = args.part_mib * 2**20
        parts = []
        with archive.open("rb") as packed:
            while chunk := packed.read(part_size):
                part = args.dest / f"p{len(parts)}" / "part"
                part.parent.mkdir(parents=True)
                part.write_bytes(chunk)
                parts.append({"path": str(part), "mib": round(len(chunk) / 2**20, 1),
                              "sha256": hashlib.sha256(chunk).hexdigest()})
        if len(parts) > 10:
            raise SystemExit("more than 10 parts: the unpack command's p? would miss some; raise --part-mib")
    report.update(unpacked_mib=round(unpacked / 2**20), parts=parts, python=args.python)
    (args.dest / "pack.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
