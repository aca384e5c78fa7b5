"""imgprep: ImageNet as downloaded to Caffe LMDB/LevelDB databases, exact mean images, and a DALI loader.

The public API is importable from here. Each name is imported from its module when first used, so a
trainer that takes `Loader` or `CaffeDataset` loads none of the preparation stack::

    from imgprep import Loader, CaffeDataset                  # loading: databases to batches
    from imgprep import prepare_data, build_database, compute_mean  # preparing: images to databases

The package has three parts: `imgprep.formats` (what is on disk: records, storage, manifests, lists),
`imgprep.prepare` (images to databases) and `imgprep.loading` (databases to batches); the last two never
import each other.
"""

from importlib import import_module

__version__ = "0.1.0"


class ImgprepError(Exception):
    """An error the user can act on: the CLI prints its message and exits non-zero, no traceback."""


_HOMES = {
    # loading: databases to batches
    "Loader": "imgprep.loading.loader",
    "UpscaleWarning": "imgprep.loading.loader",
    "CaffeDataset": "imgprep.loading.dataset",
    "Policy": "imgprep.loading.policies",
    "policy": "imgprep.loading.policies",
    "Normalisation": "imgprep.loading.policies",
    "OptionError": "imgprep.loading.options",
    "write_preview": "imgprep.loading.preview",
    "bench_loader": "imgprep.loading.bench",
    # formats: what both halves read and write
    "Datum": "imgprep.formats.codec",
    "decode_datum": "imgprep.formats.codec",
    "encode_datum": "imgprep.formats.codec",
    "load_mean": "imgprep.formats.codec",
    "Reader": "imgprep.formats.storage",
    "open_writer": "imgprep.formats.storage",
    "database_info": "imgprep.formats.database",
    "entry_key": "imgprep.formats.database",
    "read_manifest": "imgprep.formats.manifest",
    "read_list": "imgprep.formats.lists",
    "load_synsets": "imgprep.formats.lists",
    "permutation": "imgprep.formats.order",
    # prepare: images to databases
    "prepare_data": "imgprep.prepare.workflow",
    "make_lists": "imgprep.prepare.make_lists",
    "build_database": "imgprep.prepare.build",
    "BuildOptions": "imgprep.prepare.build",
    "PRESETS": "imgprep.prepare.presets",
    "image_spec": "imgprep.prepare.build",
    "resize_tree": "imgprep.prepare.resize",
    "compute_mean": "imgprep.prepare.mean",
    "MeanTransform": "imgprep.prepare.mean",
    "write_mean": "imgprep.prepare.mean",
    "inspect_db": "imgprep.prepare.inspection",
    "merge_parts": "imgprep.prepare.merge",
    "make_sample": "imgprep.prepare.sample",
}

__all__ = ["ImgprepError", "__version__", *_HOMES]


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'imgprep' has no attribute {name!r}")
    value = getattr(import_module(home), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_HOMES))
