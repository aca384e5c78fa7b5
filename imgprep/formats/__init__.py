"""What is on disk, shared by both halves: the Datum and BlobProto codec, LMDB/LevelDB storage, the
build manifest and failure report, the list format and synsets, the pinned order, image decoding.
"""
