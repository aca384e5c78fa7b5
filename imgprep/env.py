"""What `imgprep doctor` reports: the PIL build, DALI, devices, database libraries."""

from __future__ import annotations

import importlib.metadata as metadata
import platform
import sys

from . import __version__


PILLOW_SIMD = "pillow-simd"
PLAIN_PILLOW = "plain Pillow"


def pil_kind(pil_version: str, simd_version: str | None) -> str:
    """Which build provides `PIL`: pillow-simd only if its distribution is installed and is the one
    imported (both install the same `PIL` package; the one installed last wins)."""
    return PILLOW_SIMD if simd_version is not None and simd_version == pil_version else PLAIN_PILLOW


def pil_fix_command(python: str) -> str:
    """The pip commands that put pillow-simd back in place of plain Pillow (what
    scripts/ensure-pillow-simd.sh does)."""
    return (f"{python} -m pip uninstall -y pillow pillow-simd && "
            f"{python} -m pip install --no-deps --force-reinstall pillow-simd")


def pil_report(pil_version: str, simd_version: str | None, jpeg: str, python: str) -> dict[str, str]:
    """doctor's PIL lines: the build, and for plain Pillow what it costs and the command that fixes it."""
    if pil_kind(pil_version, simd_version) == PILLOW_SIMD:
        return {"PIL": f"{pil_version} (pillow-simd; JPEG: {jpeg})"}
    return {
        "PIL": f"{pil_version} (plain Pillow, NOT pillow-simd: resizing is about 4x slower, decoding "
               f"and resizing together about 1.4x; JPEG: {jpeg})",
        "fix": pil_fix_command(python),
    }


def _jpeg_library() -> str:
    from PIL import features

    turbo = features.version_feature("libjpeg_turbo") if features.check_feature("libjpeg_turbo") else None
    return f"libjpeg-turbo {turbo}" if turbo else f"libjpeg {features.version_codec('jpg')}"


def pil_build() -> dict[str, str]:
    import PIL

    try:
        simd_version = metadata.version("pillow-simd")
    except metadata.PackageNotFoundError:
        simd_version = None
    return pil_report(PIL.__version__, simd_version, _jpeg_library(), sys.executable)


def gpu_count() -> int:
    try:
        from nvidia.dali.backend import GetCUDADeviceCount

        return GetCUDADeviceCount()
    except Exception:  # no driver, no CUDA: DALI's CPU mode
        return 0


def dali_version() -> str:
    try:
        import nvidia.dali

        return nvidia.dali.__version__
    except ImportError:
        return "not installed"


def describe() -> dict[str, str]:
    import lmdb
    import numpy
    import plyvel

    gpus = gpu_count()
    info = {
        "imgprep": __version__,
        "python": platform.python_version(),
        **pil_build(),
        "numpy": numpy.__version__,
        "DALI": dali_version(),
        "devices": f"{gpus} CUDA GPU(s)" if gpus else "no GPU: loader runs in DALI's CPU mode",
        "lmdb": f"py-lmdb {lmdb.__version__}, LMDB {'.'.join(map(str, lmdb.version()))}",
        "leveldb": f"plyvel {plyvel.__version__}, LevelDB {plyvel.__leveldb_version__}",
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = "not installed (optional: pip install 'imgprep[torch]')"
    return info
