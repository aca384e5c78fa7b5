"""The loader's record reading: the hand parser of Caffe-layout Datums against codec.datum_payload, and
image sizes read from JPEG headers against what DALI's decoders (fn.peek_image_shape, CPU) and Pillow say."""

import io
import random
import struct

import numpy as np
import pytest
from PIL import Image, ImageOps

from imgprep import ImgprepError
from imgprep.formats.codec import LENGTH, VARINT, RecordError, _key, _varint, datum_payload, encode_datum
from imgprep.loading.records import RecordSource, _canonical, jpeg_size
from imgprep.formats.storage import open_writer


def payload_or_error(value):
    try:
        data, label, encoded, (c, h, w) = datum_payload(value)
    except RecordError:
        return "error"
    return bytes(data), label, (None if encoded else (h, w, c))


def parsed(value):
    """What the hand parser makes of `value`, in payload_or_error's terms (None: it leaves it to datum_payload)."""
    got = _canonical(value)
    if got is None:
        return None
    start, end, label, shape = got
    return bytes(value[start:end]), label, shape


def datum_variants():
    """Datums as Caffe, imgprep and others write them, then damaged ones."""
    rng = random.Random(4)
    out = []
    for label in (0, 1, 127, 128, 300_000, 2**31 - 1, -1, -2**31):
        out.append(encode_datum(b"\xff\xd8" + bytes(rng.randrange(256) for _ in range(200)), label, 0, 0, 0, True))
        out.append(encode_datum(bytes(rng.randrange(256) for _ in range(3 * 5 * 7)), label, 3, 5, 7, False))
        out.append(encode_datum(bytes(300), label, 3, 256, 256, True))  # encoded, with sizes
    out.append(encode_datum(bytes(1 * 20 * 30), 5, 1, 20, 30, False))  # gray raw
    data = bytes(range(60))
    body = _key(4, LENGTH) + _varint(len(data)) + data
    out += [
        body + _key(7, VARINT) + b"\x01",  # no label (0)
        body + _key(5, VARINT) + _varint(9) + _key(7, VARINT) + b"\x00",  # raw without sizes: an error
        _key(5, VARINT) + _varint(9) + body + _key(7, VARINT) + b"\x01",  # label first
        body + _key(5, VARINT) + _varint(9) + _key(7, VARINT) + b"\x01" + _key(6, LENGTH) + b"\x00",  # field after
        body + _key(5, VARINT) + _varint(9) + _key(7, VARINT) + b"\x02",  # encoded = 2
        body + _key(5, VARINT) + b"\x89\x80\x80\x80\x80\x80\x80\x80\x80\x80\x00" + _key(7, VARINT) + b"\x01",  # 11-byte varint
        _key(2, VARINT) + _varint(4) + _key(1, VARINT) + _varint(3) + _key(3, VARINT) + _varint(5) + body
        + _key(5, VARINT) + _varint(1) + _key(7, VARINT) + b"\x00",  # sizes out of order
        _key(1, VARINT) + _varint(3) + _key(2, VARINT) + _varint(4) + _key(3, VARINT) + _varint(5) + body
        + _key(5, VARINT) + _varint(1) + _key(7, VARINT) + b"\x00",  # raw 3x4x5 = 60 bytes
        _key(1, VARINT) + _varint(3) + _key(2, VARINT) + _varint(4) + _key(3, VARINT) + _varint(6) + body
        + _key(5, VARINT) + _varint(1) + _key(7, VARINT) + b"\x00",  # 3x4x6 != 60
    ]
    damaged = []
    for value in out[:6] + out[-2:]:
        damaged += [value[:cut] for cut in range(len(value))]  # every truncation
        for _ in range(40):
            flip = bytearray(value)
            flip[rng.randrange(len(flip))] = rng.randrange(256)
            damaged.append(bytes(flip))
    return out + damaged


def test_the_datum_parser_agrees_with_the_codec_or_leaves_the_record_to_it():
    taken = 0
    for value in datum_variants():
        fast = parsed(value)
        if fast is not None:
            assert fast == payload_or_error(value), value[:40]
            taken += 1
        for buffer in (memoryview(value), bytearray(value)):  # LMDB hands memoryviews, LevelDB bytes
            assert parsed(buffer) == fast
    assert taken > 30


def test_read_gives_the_codecs_payloads_and_names_a_malformed_record(tmp_path):
    good = [(b"%08d" % i, value) for i, value in enumerate(datum_variants()[:25]) if payload_or_error(value) != "error"]
    writer = open_writer(tmp_path / "db", "lmdb")
    writer.put_batch(good + [(b"99999999_bad", b"\x0f not a datum")])
    writer.close()
    expected = [payload_or_error(v) for _, v in good]
    source = RecordSource(tmp_path / "db", "lmdb")
    try:
        everything = np.arange(len(good))
        for indices in (everything, everything[::-1], np.concatenate([everything[:3], everything[:3]])):
            data, labels = source.read(indices)  # the first read parses, later ones use what it kept
            assert [(d.tobytes(), int(l), None if d.ndim == 1 else tuple(d.shape)) for d, l in zip(data, labels)] == \
                [expected[i] for i in indices]
        for _ in range(2):
            with pytest.raises(ImgprepError, match="99999999_bad"):
                source.read(np.array([len(good)]))
    finally:
        source.close()


# --- image sizes from headers --------------------------------------------------------------------

def jpeg(size=(120, 80), mode="RGB", orientation=None, **save):
    image = Image.new(mode, size, (10, 200, 30) if mode == "RGB" else 100)
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        save["exif"] = exif.tobytes()
    out = io.BytesIO()
    image.save(out, "JPEG", **save)
    return out.getvalue()


def with_segment(data: bytes, marker: int, payload: bytes, fill: bytes = b"") -> bytes:
    """`data` with a segment inserted right after SOI (and fill bytes before it)."""
    return data[:2] + fill + bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload + data[2:]


def exif_with_thumbnail_frame(orientation: int) -> bytes:
    """An APP1 Exif payload (big-endian TIFF) whose IFD0 holds the orientation, followed by bytes that
    look like a thumbnail's own frame header (SOF0 of 7x9), which must not be taken."""
    ifd = struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    thumbnail = b"\xff\xd8\xff\xc0\x00\x11\x08\x00\x09\x00\x07\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01\xff\xd9"
    return b"Exif\x00\x00" + b"MM\x00\x2a" + struct.pack(">I", 8) + ifd + thumbnail


def jpeg_cases():
    base = jpeg((120, 80))
    return {
        "baseline 4:2:0": base,
        "4:4:4 q95": jpeg((97, 61), subsampling=0, quality=95),
        "gray": jpeg((50, 70), mode="L"),
        "cmyk": jpeg((40, 30), mode="CMYK"),
        "progressive": jpeg((130, 90), progressive=True),
        "optimized, restart markers": jpeg((200, 150), optimize=True, restart_marker_rows=1),
        "icc profile and comment": jpeg((64, 48), icc_profile=b"\x00" * 3000, comment=b"a comment"),
        "exif orientation 6": jpeg((120, 80), orientation=6),
        "exif orientation 3": jpeg((120, 80), orientation=3),
        "exif orientation 8, progressive": jpeg((33, 77), orientation=8, progressive=True),
        "exif with a thumbnail frame, orientation 5": with_segment(base, 0xE1, exif_with_thumbnail_frame(5)),
        "exif with a thumbnail frame, orientation 1": with_segment(base, 0xE1, exif_with_thumbnail_frame(1)),
        "fill bytes and APP15": with_segment(base, 0xEF, b"x" * 40, fill=b"\xff\xff"),
    }


def dali_shapes(encoded: list[bytes]) -> list[tuple[int, int]]:
    """(height, width) of each image as DALI's decoders will produce it (EXIF orientation applied)."""
    from nvidia.dali import fn, pipeline_def, types

    arrays = [np.frombuffer(e, np.uint8) for e in encoded]

    @pipeline_def(batch_size=len(arrays), num_threads=1, device_id=None)
    def pipe():
        data = fn.external_source(source=lambda: arrays, batch=True, dtype=types.UINT8)
        return fn.peek_image_shape(data)

    built = pipe()
    built.build()
    return [tuple(int(v) for v in np.array(shape)[:2]) for shape in built.run()[0]]


def test_jpeg_sizes_from_headers_are_the_sizes_dali_decodes_upright():
    cases = jpeg_cases()
    expected = dict(zip(cases, dali_shapes(list(cases.values()))))
    for name, data in cases.items():
        assert jpeg_size(memoryview(data)) == expected[name], name
        with Image.open(io.BytesIO(data)) as image:
            assert jpeg_size(data) == ImageOps.exif_transpose(image).size[::-1], name
    assert expected["exif orientation 6"] == (120, 80) and expected["baseline 4:2:0"] == (80, 120)


def test_non_jpegs_and_broken_headers_are_left_to_pillow():
    png = io.BytesIO()
    Image.new("RGB", (30, 20)).save(png, "PNG")
    base = jpeg()
    for data in (png.getvalue(), b"", b"\xff\xd8", base[:60], b"\xff\xd8\xff\xda\x00\x02" + base[2:],
                 base[:2] + b"\x00" + base[2:], b"\xff\xd8\xff\xe0\xff\xff"):
        assert jpeg_size(data) is None, data[:12]


def test_sizes_of_encoded_records_turn_with_exif_and_name_a_record_without_a_header(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (30, 20)).save(png, "PNG")
    images = [jpeg((120, 80)), jpeg((120, 80), orientation=6), png.getvalue(), jpeg((64, 48), progressive=True)]
    writer = open_writer(tmp_path / "db", "lmdb")
    writer.put_batch([(b"%08d" % i, encode_datum(data, i, 0, 0, 0, True)) for i, data in enumerate(images)]
                     + [(b"00000009_broken.JPEG", encode_datum(b"\xff\xd8 not an image" * 9, 9, 0, 0, 0, True))])
    writer.close()
    source = RecordSource(tmp_path / "db", "lmdb")
    try:
        indices = np.arange(len(images))
        for _ in range(2):  # read from the headers, then kept
            data, _ = source.read(indices)
            assert source.sizes(indices, data).tolist() == [list(s) for s in dali_shapes(images)]
            assert source.sizes(indices[::-1], data[::-1]).tolist() == [[48, 64], [20, 30], [120, 80], [80, 120]]
        with pytest.raises(ImgprepError, match="00000009_broken.JPEG"):
            source.sizes(np.array([4]), source.read(np.array([4]))[0])
    finally:
        source.close()
