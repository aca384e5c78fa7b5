"""Resize policies as the CLI names them (squash:WxH, shorter:S, none) and the sizes they give: plain
arithmetic, without Pillow, so that commands which only name a policy (compute-mean) need not load it."""

from __future__ import annotations

import re
from dataclasses import dataclass

from imgprep import ImgprepError

# shorter:S keeps the aspect ratio, so a 500x33 strip would become 3879x256 (and a 1x5000 PNG
# 256x1,280,000). Beyond this ratio the long side is center-cropped first: at shorter:256 a record
# is at most 1024x256. ImageNet's photos are mostly about 4:3; outliers such as its 500x33 strip
# keep their middle (132x33).
DEFAULT_MAX_ASPECT = 4.0


@dataclass(frozen=True)
class ResizePolicy:
    """How an image is resized: `squash` to width x height, `shorter` side to `width`, or `none`; `str()` gives
    the CLI's form (squash:256x256)."""
    kind: str  # "squash", "shorter" or "none"
    width: int = 0
    height: int = 0

    def __str__(self) -> str:
        if self.kind == "squash":
            return f"squash:{self.width}x{self.height}"
        if self.kind == "shorter":
            return f"shorter:{self.width}"
        return "none"

    def crop_size(self, width: int, height: int, max_aspect: float) -> tuple[int, int]:
        """The (width, height) of the centered region resized, for an upright input: all of it,
        except that shorter:S first cuts a long side beyond `max_aspect` times the short side
        (0: no limit)."""
        if self.kind != "shorter" or not max_aspect:
            return width, height
        short = min(width, height)
        longest = max(1, round(short * max_aspect))
        return min(width, longest), min(height, longest)

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """Output (width, height) for an upright input of the given size."""
        if self.kind == "squash":
            return self.width, self.height
        if self.kind == "shorter":
            short = min(width, height)
            scale = self.width / short
            return max(1, round(width * scale)), max(1, round(height * scale))
        return width, height


def parse_resize(text: str) -> ResizePolicy:
    """`squash:WxH` (or `squash:S`), `shorter:S`, or `none`."""
    text = text.strip().lower()
    if text == "none":
        return ResizePolicy("none")
    m = re.fullmatch(r"squash:(\d+)(?:x(\d+))?", text)
    if m:
        w = int(m.group(1))
        h = int(m.group(2) or w)
        if w > 0 and h > 0:
            return ResizePolicy("squash", w, h)
    m = re.fullmatch(r"shorter:(\d+)", text)
    if m and int(m.group(1)) > 0:
        return ResizePolicy("shorter", int(m.group(1)), int(m.group(1)))
    raise ImgprepError(f"bad resize policy {text!r}: use squash:WxH, shorter:S or none")


def check_max_aspect(value: float) -> float:
    """`--max-aspect` as a float: 0 (no limit) or at least 1; anything else is refused."""
    if value != 0 and not value >= 1:
        raise ImgprepError(f"--max-aspect must be 0 (no limit) or at least 1, not {value}")
    return float(value)
