"""imgprep's Datum / BlobProto codec vs Google's protobuf runtime (upb), microseconds per message.

    python benchmarks/bench_codec.py        (needs the test extra: protobuf)

The protobuf classes are the tests' independent ones (built from a descriptor, no protoc).
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from caffe_proto import BlobProto, Datum  # noqa: E402

from imgprep.formats.codec import decode_blob, decode_datum, encode_blob, encode_datum  # noqa: E402


def best_us(fn, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main():
    from google.protobuf.internal import api_implementation

    rng = np.random.default_rng(0)
    mean = rng.uniform(0, 255, (3, 256, 256)).astype(np.float32)
    rows = []
    for name, data, encoded in (("raw 3x256x256 Datum", rng.bytes(3 * 256 * 256), False),
                                ("JPEG Datum, 38 KB", rng.bytes(38_000), True)):
        ours = encode_datum(data, 7, 3, 256, 256, encoded)

        def upb_encode():
            return Datum(channels=3, height=256, width=256, data=data, label=7, encoded=encoded).SerializeToString()

        def upb_decode():
            datum = Datum()
            datum.ParseFromString(ours)
            return datum.data, datum.label

        rows.append((f"{name}, encode", best_us(lambda: encode_datum(data, 7, 3, 256, 256, encoded), 2000),
                     best_us(upb_encode, 2000)))
        rows.append((f"{name}, decode", best_us(lambda: decode_datum(ours), 2000), best_us(upb_decode, 2000)))
    blob = encode_blob(mean)

    def upb_blob_encode():
        message = BlobProto(num=1, channels=3, height=256, width=256)
        message.data.extend(mean.ravel())
        return message.SerializeToString()

    def upb_blob_decode():
        message = BlobProto()
        message.ParseFromString(blob)
        return np.array(message.data, np.float32).reshape(3, 256, 256)

    rows.append(("mean BlobProto 3x256x256, encode", best_us(lambda: encode_blob(mean), 50), best_us(upb_blob_encode, 3)))
    rows.append(("mean BlobProto 3x256x256, decode", best_us(lambda: decode_blob(blob), 50), best_us(upb_blob_decode, 20)))
    print(f"protobuf runtime: {api_implementation.Type()}; best of 5 repeats")
    print("\n| message, operation | imgprep codec (us) | protobuf (us) | imgprep / protobuf |\n|---|---:|---:|---:|")
    for name, ours, theirs in rows:
        print(f"| {name} | {ours:,.1f} | {theirs:,.1f} | {ours / theirs:.2f} |")


if __name__ == "__main__":
    main()
