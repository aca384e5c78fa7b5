import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from imgprep import ImgprepError
from imgprep.formats.imageops import ImageFailure, ImageSpec, ImageWarning, bgr_chw_to_rgb_hwc, center_crop, decode_upright, process_image, to_bgr_chw
from imgprep.formats.resizing import check_max_aspect, parse_resize
from imgprep.prepare.sample import PHOTOS_DIR

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


def _strip(width, height):
    """An image whose first, middle and last thirds (of its long side) are red, green and blue."""
    img = Image.new("RGB", (width, height), (0, 255, 0))
    third = max(width, height) // 3
    img.paste((255, 0, 0), (0, 0, third, height) if width > height else (0, 0, width, third))
    img.paste((0, 0, 255), (width - third, 0, width, height) if width > height else (0, height - third, width, height))
    return img


def _chw(image):
    return np.frombuffer(image.data, np.uint8).reshape(image.channels, image.height, image.width)


def test_extreme_aspect_ratios_are_center_cropped_to_the_cap():
    shorter = parse_resize("shorter:256")
    wide = process_image(save(_strip(500, 33), "PNG"), ImageSpec(shorter, encoded=False))
    assert (wide.width, wide.height) == (1024, 256)  # the middle 132x33, not 3879x256
    assert (_chw(wide) == np.array([0, 255, 0], np.uint8)[:, None, None]).all()  # all of it green
    tall = process_image(save(_strip(33, 500), quality=95), ImageSpec(shorter, encoded=True))
    assert (tall.width, tall.height) == (256, 1024)
    thin = process_image(save(Image.new("L", (1, 5000), 7), "PNG"), ImageSpec(shorter, encoded=True))
    assert (thin.width, thin.height) == (256, 1024)
    # within the cap, and other policies, nothing is cut
    within = process_image(save(_strip(400, 100), "PNG"), ImageSpec(shorter, encoded=False))
    assert within.width == 1024 and set(_chw(within)[:, 128, 0]) == {0, 255}  # the red third is kept
    assert process_image(save(_strip(500, 33), "PNG"), ImageSpec(parse_resize("squash:64x64"))).width == 64
    assert process_image(save(_strip(500, 33), "PNG"), ImageSpec(max_aspect=4)).width == 500
    uncapped = process_image(save(_strip(500, 33), "PNG"), ImageSpec(shorter, encoded=False, max_aspect=0))
    assert (uncapped.width, uncapped.height) == (3879, 256)


def test_an_output_over_the_pixel_limit_fails_before_resizing():
    with pytest.raises(ImageFailure) as info:
        process_image(save(Image.new("L", (1, 20000)), "PNG"), ImageSpec(parse_resize("shorter:256"), max_aspect=0))
    assert info.value.reason == "too-large" and "256x5120000" in info.value.detail


def test_an_output_beyond_jpegs_side_limit_fails_before_resizing():
    # 256x76800 is within the pixel limit but not a JPEG: the encoder failed with "broken data stream"
    with pytest.raises(ImageFailure) as info:
        process_image(save(Image.new("L", (1, 300)), "PNG"), ImageSpec(parse_resize("shorter:256"), max_aspect=0))
    assert info.value.reason == "too-large" and "65,500" in info.value.detail


def _odd_images():
    for mode in ("LAB", "HSV", "YCbCr", "I;16", "CMYK", "F", "1", "LA", "PA"):
        for fmt in ("TIFF", "PNG", "JPEG", "GIF", "BMP", "WEBP"):
            try:
                yield f"{mode} {fmt}", save(Image.new(mode, (5, 3)), fmt)
            except Exception:  # Pillow cannot write this pair
                pass
    rng = np.random.default_rng(0)
    for fmt in ("JPEG", "PNG", "TIFF", "GIF"):
        good = np.frombuffer(save(Image.new("RGB", (24, 16), (9, 99, 199)), fmt), np.uint8)
        for n in range(60):
            mutated = good.copy()
            spots = rng.integers(0, len(good), 1 + n % 5)
            mutated[spots] = rng.integers(0, 256, len(spots))
            yield f"mutated {fmt} {n}", mutated.tobytes()


@pytest.mark.filterwarnings("ignore::imgprep.formats.imageops.ImageWarning")
def test_odd_or_mangled_images_are_processed_or_fail_never_raise_anything_else():
    """A LAB TIFF (pillow-simd has no colour-management module to convert it), modes and formats
    of every kind, and a few hundred mangled files: each is an image or an ImageFailure."""
    reasons = set()
    for _, data in _odd_images():
        for spec in (ImageSpec(parse_resize("shorter:8")), ImageSpec(parse_resize("squash:4x4"), encoded=False)):
            try:
                process_image(data, spec)
            except ImageFailure as e:
                reasons.add(e.reason)
    assert reasons <= {"unreadable", "truncated", "corrupt", "error", "too-large"}, reasons


def test_a_corrupt_exif_warning_names_the_image():
    exif = Image.Exif()
    exif[0x010F] = "a maker name long enough to live outside the IFD"
    data = bytearray(save(upright_photo(), exif=exif.tobytes()))
    at = data.find(b"Exif\x00\x00MM") + 6
    data[at + 8:at + 10] = b"\x00\xff"  # the IFD claims 255 entries; the block holds one
    with pytest.warns(ImageWarning, match="n01440764/x.JPEG: .*EXIF"):
        image = process_image(bytes(data), ImageSpec(parse_resize("shorter:64")), name="n01440764/x.JPEG")
    assert image.height == 64


def test_max_aspect_must_be_zero_or_at_least_one():
    assert check_max_aspect(0) == 0 and check_max_aspect(1.5) == 1.5
    for bad in (0.5, -1, float("nan")):
        with pytest.raises(ImgprepError, match="--max-aspect"):
            check_max_aspect(bad)


def test_one_image_never_stops_a_build(tmp_path):
    """build-lmdb --preset resnet on a 1x300 PNG (once 256x76800, which no JPEG holds: the build died
    with `broken data stream`) and a LAB TIFF: a cropped record, and a record or a failure."""
    from conftest import run_cli
    from imgprep.formats.manifest import read_manifest

    root = tmp_path / "root"
    root.mkdir()
    Image.new("L", (1, 300), 50).save(root / "strip.JPEG", "PNG")
    Image.new("LAB", (8, 8)).save(root / "lab.JPEG", "TIFF")
    (tmp_path / "list.txt").write_text("strip.JPEG 0\nlab.JPEG 1\n")
    result = run_cli("build-lmdb", tmp_path / "list.txt", root, tmp_path / "db", "--preset", "resnet", "--jobs", "1",
                     "--json", check=False)
    assert result.returncode in (0, 3) and "Traceback" not in result.stderr, result.stderr
    assert read_manifest(tmp_path / "db")["state"] == "complete"
    failed = (tmp_path / "db" / "imgprep-failures.tsv").read_text()
    assert "strip.JPEG" not in failed and result.returncode == (3 if "lab.JPEG" in failed else 0)
