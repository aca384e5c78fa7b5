import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from imgprep import ImgprepError
from imgprep.imageops import (ImageFailure, ImageSpec, bgr_chw_to_rgb_hwc, center_crop,
                              decode_upright, parse_resize, process_image, to_bgr_chw)
from imgprep.sample import PHOTOS_DIR

PHOTO = (PHOTOS_DIR / "chelsea.jpg").read_bytes()  # 451x300 RGB JPEG


def save(img, fmt="JPEG", **kwargs):
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def upright_photo():
    return Image.open(io.BytesIO(PHOTO)).convert("RGB")


def test_parse_resize():
    assert str(parse_resize("squash:256x256")) == "squash:256x256"
    assert str(parse_resize("squash:224")) == "squash:224x224"
    assert str(parse_resize("SHORTER:256")) == "shorter:256"
    assert parse_resize("none").kind == "none"
    for bad in ("shorter", "squash:0x5", "crop:3", "shorter:-1"):
        with pytest.raises(ImgprepError, match="bad resize policy"):
            parse_resize(bad)


def test_shorter_side_keeps_aspect():
    policy = parse_resize("shorter:256")
    assert policy.target_size(500, 375) == (341, 256)
    assert policy.target_size(375, 500) == (256, 341)
    assert policy.target_size(500, 33) == (3879, 256)


def test_raw_pixels_are_bgr_planar():
    img = Image.new("RGB", (3, 2), (255, 10, 0))
    chw = to_bgr_chw(img)
    assert chw.shape == (3, 2, 3)
    assert (chw[0] == 0).all() and (chw[1] == 10).all() and (chw[2] == 255).all()
    np.testing.assert_array_equal(bgr_chw_to_rgb_hwc(chw), np.asarray(img))


def test_exif_rotated_is_stored_upright():
    upright = upright_photo()
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = save(upright.transpose(Image.ROTATE_90), quality=95, exif=exif.tobytes())
    _, img = decode_upright(stored)
    assert img.size == upright.size
    diff = np.abs(np.asarray(img, np.int16) - np.asarray(upright, np.int16)).mean()
    assert diff < 3, diff
    image = process_image(stored, ImageSpec(encoded=True))  # resize none: re-encoded, upright
    assert image.data != stored and (image.width, image.height) == upright.size


def test_cmyk_png_rgba_palette_and_16bit_become_rgb():
    rgb = upright_photo()
    cmyk = decode_upright(save(rgb.convert("CMYK"), quality=95))[1]
    assert cmyk.mode == "RGB"
    assert np.abs(np.asarray(cmyk, np.int16) - np.asarray(rgb, np.int16)).mean() < 6
    assert decode_upright(save(rgb, "PNG"))[1].mode == "RGB"

    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 255, 0))  # fully transparent blue -> white, not blue
    flat = np.asarray(decode_upright(save(rgba, "PNG"))[1])
    assert flat[0, 0].tolist() == [255, 255, 255] and flat[1, 1].tolist() == [255, 0, 0]

    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    assert np.asarray(decode_upright(save(palette, "PNG"))[1])[0, 0].tolist() == [0, 255, 0]

    deep = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16))
    out = np.asarray(decode_upright(save(deep, "PNG"))[1])
    assert out[0, :, 0].tolist() == [0, 100, 255]


def test_gray_option_gives_one_channel():
    image = process_image(PHOTO, ImageSpec(resize=parse_resize("squash:64x64"), encoded=False, gray=True))
    assert (image.channels, image.height, image.width) == (1, 64, 64) and len(image.data) == 64 * 64


def test_tiny_image_is_resized_not_rejected():
    image = process_image(save(Image.new("RGB", (1, 1), (9, 9, 9))), ImageSpec(parse_resize("squash:256x256"), encoded=False))
    assert (image.height, image.width) == (256, 256) and set(image.data) == {9}


def test_original_jpeg_bytes_kept_only_when_nothing_changes_them():
    assert process_image(PHOTO, ImageSpec(encoded=True)).data == PHOTO
    png = save(upright_photo(), "PNG")
    recoded = process_image(png, ImageSpec(encoded=True)).data
    assert recoded[:2] == b"\xff\xd8" and Image.open(io.BytesIO(recoded)).mode == "RGB"
    gray_jpeg = save(upright_photo().convert("L"))
    assert Image.open(io.BytesIO(process_image(gray_jpeg, ImageSpec(encoded=True)).data)).mode == "RGB"
    assert process_image(PHOTO, ImageSpec(parse_resize("shorter:256"), encoded=True)).data != PHOTO


def _png_claiming(width, height):
    small = save(Image.new("L", (1, 1)), "PNG")
    ihdr = struct.pack(">II", width, height) + small[24:29]
    chunk = b"IHDR" + ihdr
    return small[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + small[33:]


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"\x00garbage" * 100, "unreadable"),
    (PHOTO[: len(PHOTO) // 2], "truncated"),
    (_png_claiming(200_000, 200_000), "too-large"),
])
def test_bad_images_fail_with_a_reason(data, reason):
    with pytest.raises(ImageFailure) as info:
        process_image(data, ImageSpec(parse_resize("squash:32x32"), encoded=False))
    assert info.value.reason == reason


def test_draft_decoding_is_close_to_full_decoding():
    big = save(Image.open(PHOTOS_DIR / "retina.jpg").convert("RGB"), quality=95)  # 1411x1411
    policy = parse_resize("shorter:256")
    fast = np.asarray(decode_upright(big, ImageSpec(policy, draft=True))[1], np.int16)
    full = np.asarray(decode_upright(big, ImageSpec(policy, draft=False))[1], np.int16)
    assert fast.shape == full.shape == (256, 256, 3)
    assert np.abs(fast - full).mean() < 2.0


def test_center_crop_offsets():
    arr = np.arange(5 * 6).reshape(5, 6)
    assert center_crop(arr, 3).tolist() == arr[1:4, 2:5].tolist()
    with pytest.raises(ImgprepError):
        center_crop(arr, 7)
