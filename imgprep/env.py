"""What `imgprep doctor` reports: the PIL build, DALI, devices, database libraries."""

from __future__ import annotations

import importlib.metadata as metadata
import platform

from . import __version__


def pil_build() -> str:
    import PIL
    from PIL import features

    try:
        simd = metadata.version("pillow-simd") == PIL.__version__
    except metadata.PackageNotFoundError:
        simd = False
    turbo = features.check_feature("libjpeg_turbo")
    return (f"{PIL.__version__} ({'pillow-simd' if simd else 'plain Pillow, not pillow-simd'}; "
            f"JPEG: {'libjpeg-turbo' if turbo else 'libjpeg'} {features.version_codec('jpg')})")


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
        "PIL": pil_build(),
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
