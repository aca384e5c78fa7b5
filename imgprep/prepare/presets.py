"""build-lmdb's --preset recipes: what each one's records are (explicit options override them; see
build.image_spec). A module of its own so that the command line can offer the names without importing
the build."""

PRESETS = {
    "caffe": {"resize": "squash:256x256", "encoded": False},
    "resnet": {"resize": "shorter:256", "encoded": True},
    "resnet480": {"resize": "shorter:480", "encoded": True},
}
