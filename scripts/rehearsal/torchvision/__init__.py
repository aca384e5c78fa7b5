"""A stand-in for torchvision in gpu-check's rehearsal on a CPU (`gpu-check.sh --dry-run`), put on the
path of the training steps only: `models.resnet50` is a small network with ResNet-50's interface, so
the training command lines run in seconds without a GPU (and where torchvision is not installed).
It has no `transforms`: imgprep's Pillow transforms stand in for those, as they do without torchvision."""

from . import models  # noqa: F401

__version__ = "rehearsal stand-in"
