"""Pure image transforms: decode upright, normalise the mode, resize by policy, encode.

Everything here takes bytes or images and returns new ones; no file-system access. Failures
raise `ImageFailure` with a short reason code that the failure report records.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin

from imgprep import ImgprepError
from imgprep.formats.resizing import DEFAULT_MAX_ASPECT, ResizePolicy

# ImageNet's largest is about 10 MP; 100 MP leaves room for real photos and refuses bombs.
DEFAULT_MAX_PIXELS = 100_000_000
JPEG_MAX_SIDE = 65_500  # libjpeg's limit; beyond it the encoder fails with "broken data stream"
EXIF_ORIENTATION = 0x0112
JPEG_START = b"\xff\xd8\xff"  # SOI, then the first marker
SUBSAMPLING_420 = 2


class ImageWarning(UserWarning):
    """Something odd in an image that was still used (e.g. a corrupt EXIF block), naming the file."""


def _format_warning(message, category, filename, lineno, line=None, _default=warnings.formatwarning):
    """`warning: <file>: <what>` for an ImageWarning (which line of imgprep issued it means nothing to
    a user); Python's format for every other warning."""
    if issubclass(category, ImageWarning):
        return f"warning: {message}\n"
    return _default(message, category, filename, lineno, line)


warnings.formatwarning = _format_warning


class ImageFailure(Exception):
    """An image that cannot be used; `reason` is a short code for the failure report."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageSpec:
    """What the build (or resize) makes of each image."""

    resize: ResizePolicy = ResizePolicy("none")
    encoded: bool = True
    quality: int = 90
    gray: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS  # refused above this many pixels, in the file or the output
    draft: bool = True  # decode-time DCT downscaling for JPEG sources
    max_aspect: float = DEFAULT_MAX_ASPECT  # shorter:S only; see ResizePolicy.crop_size


@dataclass
class ProcessedImage:
    """One image as a record stores it: JPEG bytes (`encoded`) or BGR planar pixels, with its size."""
    parts: tuple[bytes, ...]  # the JPEG bytes (encoded), or the planes B, G, R (raw; one plane if gray)
    channels: int
    height: int
    width: int
    encoded: bool

    @property
    def data(self) -> bytes:
        """The JPEG bytes, or the BGR planar (C, H, W) pixels, in one piece."""
        return b"".join(self.parts)  # a single part is returned as it is, not copied


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Identifies the image and checks its declared size, without decoding pixels."""
    if not data:
        raise ImageFailure("empty", "file has 0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = _open_jpeg(data) if data.startswith(JPEG_START) else None
            img = img or Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageFailure("too-large", str(e)) from None
    except Exception:  # Pillow raises many kinds for unknown bytes
        raise ImageFailure("unreadable", f"not an image format Pillow knows ({len(data):,} bytes "
                                         f"starting {data[:8].hex(' ')})") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageFailure("too-large", f"{w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,}")
    if w < 1 or h < 1:
        raise ImageFailure("unreadable", f"image declares size {w}x{h}")
    return img


def _open_jpeg(data: bytes) -> Image.Image | None:
    """A JPEG opened by Pillow's JPEG plugin at once (JPEG or MPO, as Image.open would pick), or None
    where the plugin refuses it (Image.open then says what it is). Image.open first asks every
    registered format whether the bytes are its own: ~17 µs of a tiny JPEG's ~200 µs per record."""
    try:
        img = JpegImagePlugin.jpeg_factory(io.BytesIO(data))
    except Exception:
        return None
    Image._decompression_bomb_check(img.size)  # as Image.open does (Image.MAX_IMAGE_PIXELS)
    return img


def _load(img: Image.Image) -> None:
    try:
        img.load()
    except OSError as e:
        text = str(e)
        reason = "truncated" if "truncated" in text or "broken data stream" in text else "corrupt"
        raise ImageFailure(reason, text) from None
    except Exception as e:
        raise ImageFailure("corrupt", f"{type(e).__name__}: {e}") from None


def orientation(img: Image.Image) -> int:
    """The image's EXIF orientation (1..8); 1 (upright) where there is none or the EXIF block is broken."""
    try:
        return int(img.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block must not lose the image
        return 1


def _flatten_alpha(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def normalise_mode(img: Image.Image, gray: bool = False) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (or L with gray=True). Alpha is composited over white."""
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = _flatten_alpha(img)
    elif mode.startswith("I") or mode == "F":
        arr = np.asarray(img)
        if mode == "F":
            arr = np.clip(arr, 0, 255).astype(np.uint8)
        else:
            # 16-bit sources: map 0..65535 onto 0..255 with rounding.
            arr = ((arr.astype(np.uint64) * 255 + 32767) // 65535).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "L")
    elif mode == "1":
        img = img.convert("L")
    if gray:
        return img if img.mode == "L" else img.convert("L")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_upright(data: bytes, spec: ImageSpec = ImageSpec()) -> tuple[Image.Image, Image.Image]:
    """Returns (source image as opened, upright normalised image resized by spec.resize)."""
    img = open_image(data, spec.max_pixels)
    rotation = orientation(img)
    w, h = img.size
    turned = rotation in (5, 6, 7, 8)
    upright_w, upright_h = (h, w) if turned else (w, h)
    crop_w, crop_h = spec.resize.crop_size(upright_w, upright_h, spec.max_aspect)
    tw, th = spec.resize.target_size(crop_w, crop_h)
    if tw * th > spec.max_pixels:
        raise ImageFailure("too-large", f"{upright_w}x{upright_h} resized by {spec.resize} would be {tw}x{th} = "
                                        f"{tw * th:,} pixels, over the limit of {spec.max_pixels:,}")
    if spec.encoded and max(tw, th) > JPEG_MAX_SIDE:
        raise ImageFailure("too-large", f"{upright_w}x{upright_h} resized by {spec.resize} would be {tw}x{th}, "
                                        f"beyond JPEG's limit of {JPEG_MAX_SIDE:,} pixels a side")
    if spec.draft and spec.resize.kind != "none" and img.format == "JPEG":
        # The draft keeps the whole frame at least large enough for the cropped region to cover the target.
        full_w, full_h = -(-tw * upright_w // crop_w), -(-th * upright_h // crop_h)
        request = (full_h, full_w) if turned else (full_w, full_h)
        img.draft("L" if spec.gray else ("RGB" if img.mode == "RGB" else None), request)
    _load(img)
    source = img
    if rotation != 1:
        img = ImageOps.exif_transpose(img)
    img = normalise_mode(img, spec.gray)
    if (crop_w, crop_h) != (upright_w, upright_h):
        img = img.crop(_centered_box(img.size, crop_w / upright_w, crop_h / upright_h))
    if img.size != (tw, th):
        img = img.resize((tw, th), Image.BILINEAR)
    return source, img


def _centered_box(size: tuple[int, int], keep_w: float, keep_h: float) -> tuple[int, int, int, int]:
    """The centered box keeping these fractions of a (possibly DCT-scaled) image's width and height."""
    w, h = size
    cw, ch = max(1, round(w * keep_w)), max(1, round(h * keep_h))
    left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    """`img` as JPEG bytes at `quality`, with 4:2:0 chroma subsampling for color."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, subsampling=SUBSAMPLING_420 if img.mode == "RGB" else 0)
    return buf.getvalue()


def to_bgr_chw(img: Image.Image) -> np.ndarray:
    """RGB or L image -> Caffe's (C, H, W) uint8 BGR planar array."""
    arr = np.asarray(img)
    if arr.ndim == 2:
        return arr[None]
    return np.ascontiguousarray(arr[:, :, ::-1].transpose(2, 0, 1))


def bgr_planes(img: Image.Image) -> tuple[bytes, ...]:
    """RGB or L image -> the planes of Caffe's raw Datum bytes, in order (B, G, R; or the one gray
    plane). Pillow packs one band at a time without making an image per band (split's way), and
    either is about twice as fast as a numpy transpose; the planes are left apart so that a writer
    can put them where the record goes without joining them first."""
    if img.mode == "L":
        return (img.tobytes(),)
    return tuple(img.tobytes("raw", band) for band in "BGR")


def bgr_chw_to_rgb_hwc(chw: np.ndarray) -> np.ndarray:
    """A record's BGR planar (C, H, W) pixels as an RGB (H, W, C) image array; a 1-channel record as (H, W)."""
    if chw.shape[0] == 1:
        return chw[0]
    return np.ascontiguousarray(chw[::-1].transpose(1, 2, 0))


def keeps_original(source: Image.Image, spec: ImageSpec) -> bool:
    """Caffe stores an encoded image's file untouched when nothing changes it; so do we when it
    is already an upright JPEG of the wanted colour kind."""
    wanted = "L" if spec.gray else "RGB"
    return (spec.encoded and spec.resize.kind == "none" and source.format == "JPEG"
            and source.mode == wanted and orientation(source) == 1)


def process_image(data: bytes, spec: ImageSpec, name: str | None = None) -> ProcessedImage:
    """One list entry's bytes -> what goes into its Datum.

    Every error about this one image (Pillow's, an encoder's, running out of memory) becomes an
    `ImageFailure`, so one image never stops a build. Pillow's warnings (e.g. a corrupt EXIF block)
    are re-issued as `ImageWarning`s that start with `name`.
    """
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            return _process(data, spec)
    except ImageFailure:
        raise
    except MemoryError:
        raise ImageFailure("too-large", "out of memory while processing it") from None
    except Exception as e:
        raise ImageFailure("error", f"{type(e).__name__}: {e}") from None
    finally:
        for message in dict.fromkeys(str(w.message).strip() for w in caught):
            warnings.warn(f"{name or 'image'}: {message}", ImageWarning, stacklevel=2)


def _process(data: bytes, spec: ImageSpec) -> ProcessedImage:
    source, img = decode_upright(data, spec)
    channels = 1 if img.mode == "L" else 3
    width, height = img.size
    if spec.encoded:
        payload = data if keeps_original(source, spec) else encode_jpeg(img, spec.quality)
        return ProcessedImage((payload,), channels, height, width, True)
    return ProcessedImage(bgr_planes(img), channels, height, width, False)


def decode_to_rgb(data: bytes, gray: bool = False) -> np.ndarray:
    """Encoded record bytes -> upright (H, W, 3) RGB uint8 (or (H, W) with gray=True)."""
    _, img = decode_upright(data, ImageSpec(gray=gray))
    return np.asarray(img)


def center_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """Center `size`x`size` crop of an (H, W, ...) array; a half-pixel offset rounds up."""
    h, w = arr.shape[:2]
    if h < size or w < size:
        raise ImgprepError(f"image {w}x{h} is smaller than the {size}x{size} crop")
    y = (h - size + 1) // 2
    x = (w - size + 1) // 2
    return arr[y:y + size, x:x + size]
