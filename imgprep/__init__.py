"""imgprep: ImageNet-style data preparation for Caffe databases and DALI loaders."""

__version__ = "0.1.0"


class ImgprepError(Exception):
    """An error the user can act on: the CLI prints its message and exits non-zero, no traceback."""
