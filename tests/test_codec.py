import random

import numpy as np
import pytest

from caffe_proto import BlobProto, Datum
from imgprep.formats.codec import RecordError, decode_blob, decode_datum, encode_blob, encode_datum

RAW_256_HEADER = bytes.fromhex("08 03 10 80 02 18 80 02 22 80 80 0c")
BLOB_HEADER = bytes.fromhex("08 01 10 03 18 80 02 20 80 02 2a 80 80 30")


def test_raw_datum_bytes_are_caffes():
    pixels = bytes(range(256)) * 768
    value = encode_datum(pixels, 0, 3, 256, 256, encoded=False)
    assert value == RAW_256_HEADER + pixels + bytes.fromhex("28 00 38 00")
    reference = Datum(channels=3, height=256, width=256, data=pixels, label=0, encoded=False)
    assert value == reference.SerializeToString()


@pytest.mark.parametrize("label", [0, 1, 999, 2**31 - 1, -1])
def test_datum_round_trips_through_protobuf(label):
    value = encode_datum(b"\xff\xd8jpeg", label, 3, 375, 500, encoded=True)
    parsed = Datum()
    parsed.ParseFromString(value)
    assert (parsed.label, parsed.encoded, parsed.data) == (label, True, b"\xff\xd8jpeg")
    assert (parsed.channels, parsed.height, parsed.width) == (3, 375, 500)
    ours = decode_datum(parsed.SerializeToString())
    assert (ours.label, ours.encoded, ours.data, ours.height) == (label, True, b"\xff\xd8jpeg", 375)


def test_decoder_reads_what_protobuf_writes_unusually():
    # float_data, unpacked, and fields in reverse order: valid protobuf, not what Caffe writes.
    reference = Datum(channels=1, height=1, width=2, float_data=[0.5, 2.0], label=7)
    value = reference.SerializeToString()
    datum = decode_datum(value)
    assert datum.label == 7 and list(datum.float_data) == [0.5, 2.0]
    swapped = encode_datum(b"ab", 3, 1, 1, 2, False)
    assert decode_datum(swapped[-4:] + swapped[:-4]).pixels().tolist() == [[[97, 98]]]


def test_blob_bytes_are_compute_image_means():
    mean = np.random.default_rng(0).uniform(0, 255, (3, 256, 256)).astype(np.float32)
    value = encode_blob(mean)
    assert value.startswith(BLOB_HEADER) and len(value) == len(BLOB_HEADER) + mean.nbytes
    parsed = BlobProto()
    parsed.ParseFromString(value)
    assert (parsed.num, parsed.channels, parsed.height, parsed.width) == (1, 3, 256, 256)
    assert not parsed.HasField("shape") and len(parsed.diff) == 0
    np.testing.assert_array_equal(np.array(parsed.data, np.float32).reshape(3, 256, 256), mean)
    np.testing.assert_array_equal(decode_blob(value), mean)


def test_blob_with_shape_only_pycaffe_style():
    mean = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    blob = BlobProto()
    blob.shape.dim.extend([1, 3, 4, 5])
    blob.data.extend(mean.ravel().tolist())
    np.testing.assert_array_equal(decode_blob(blob.SerializeToString()), mean)
    doubles = BlobProto(num=1, channels=3, height=4, width=5)
    doubles.double_data.extend(mean.ravel().tolist())
    np.testing.assert_array_equal(decode_blob(doubles.SerializeToString()), mean)


@pytest.mark.parametrize("bad, message", [
    (b"\x08", "truncated varint"),
    (b"\x22\x05ab", "claims 5 bytes"),
    (b"\x08\x03\x10\x02\x18\x02\x22\x03abc\x38\x00", "raw record holds 3 bytes"),
    (b"\x0f", "wire type 7"),
    (b"\x28\x01", "no data"),
    (b"\xff" * 11, "varint longer"),
])
def test_malformed_datum_is_a_clear_error(bad, message):
    with pytest.raises(RecordError, match=message):
        decode_datum(bad)


def test_malformed_blob_is_a_clear_error():
    good = encode_blob(np.ones((3, 2, 2), np.float32))
    with pytest.raises(RecordError, match="claims 48 bytes"):
        decode_blob(good[:-8])  # truncated inside the data: the length prefix now overshoots
    with pytest.raises(RecordError, match="declares shape"):
        decode_blob(good.replace(b"\x18\x02", b"\x18\x03", 1))
    with pytest.raises(RecordError, match="not a BlobProto"):
        decode_blob(b"")


def _mutations(seed_values, count, seed):
    rng = random.Random(seed)
    for _ in range(count):
        value = bytearray(rng.choice(seed_values))
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            if op < 0.4 and value:
                value[rng.randrange(len(value))] = rng.randrange(256)
            elif op < 0.7:
                value = value[: rng.randrange(len(value) + 1)]
            else:
                value[rng.randrange(len(value) + 1):0] = rng.randbytes(rng.randint(1, 12))
        yield bytes(value)
    for _ in range(count // 4):
        yield rng.randbytes(rng.randint(0, 64))


def test_fuzz_decoders_never_crash():
    """Thousands of mutated and random inputs: each decodes or raises RecordError, nothing else."""
    datums = [encode_datum(bytes(12), 3, 3, 2, 2, False), encode_datum(b"\xff\xd8" * 20, 5, 3, 9, 9, True)]
    blobs = [encode_blob(np.ones((3, 2, 2), np.float32))]
    outcomes = {"ok": 0, "error": 0}
    for decode, seeds in ((decode_datum, datums), (decode_blob, blobs)):
        for value in _mutations(seeds, 3000, seed=1234):
            try:
                decode(value)
                outcomes["ok"] += 1
            except RecordError:
                outcomes["error"] += 1
    assert outcomes["ok"] > 100 and outcomes["error"] > 1000, outcomes
