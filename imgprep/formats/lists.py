"""The list format (Caffe's `path label` lines) and the ILSVRC12 synsets: reading, checking and writing lists."""

from __future__ import annotations

import os
import posixpath
import re
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgprep import ImgprepError
from imgprep.formats.files import read_user_file

PACKAGE_ILSVRC12 = Path(__file__).parent.parent / "data" / "ilsvrc12"
SYNSETS_FILE = PACKAGE_ILSVRC12 / "synsets.txt"
SYNSET_WORDS_FILE = PACKAGE_ILSVRC12 / "synset_words.txt"
IMAGE_EXTENSIONS = frozenset(
    {".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".jpe"})
# File names may be any bytes; lists carry them through unchanged (Caffe reads bytes too).
LIST_ENCODING = dict(encoding="utf-8", errors="surrogateescape")
WNID_RE = re.compile(r"^n[0-9]{8}$")
LABEL_RE = re.compile(r"[+-]?[0-9]+")  # ASCII digits only: int() would also take '３' or '٣'
SHOWN = 10  # how many offending items an error message lists
# ILSVRC2012 as published: images in all, and the fewest in one class (train: 732 to 1,300 a class)
ILSVRC2012_COUNTS = {"train": (1_281_167, 732), "val": (50_000, 50)}
INT32_MAX = 2**31 - 1


def read_text(path: Path, what: str, encoding: str = "utf-8-sig", data: bytes | None = None) -> str:
    """A text file that must be UTF-8 (a BOM is allowed); anything else is an error naming it. `data`:
    the file's bytes, already read (from an archive member named `path`)."""
    if data is None:
        data = read_user_file(path, what)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        looks = ""
        if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
            looks = " (it starts with a UTF-16 byte-order mark)"
        raise ImgprepError(f"{what} {path} is not UTF-8 text{looks}: byte 0x{data[e.start]:02x} at offset "
                           f"{e.start} is invalid; save it as UTF-8 (plain ASCII is UTF-8)") from None


def load_synsets(path: str | os.PathLike | None = None) -> list[str]:
    """The wnids, one per line; line i is label i. Defaults to the shipped ILSVRC12 list."""
    path = Path(path) if path else SYNSETS_FILE
    text = read_text(path, "synsets file")
    wnids = [line.split()[0] for line in text.splitlines() if line.strip()]
    duplicates = sorted(w for w, n in Counter(wnids).items() if n > 1)
    if duplicates:
        raise ImgprepError(f"synsets file {path} lists {', '.join(duplicates[:SHOWN])} more than once")
    return wnids


def load_synset_words(path: str | os.PathLike | None = None) -> dict[str, str]:
    """wnid -> words from a synset_words.txt (`n01440764 tench, Tinca tinca` lines); default: the shipped
    ILSVRC12 one."""
    path = Path(path) if path else SYNSET_WORDS_FILE
    words = {}
    for line in read_text(path, "synset words file").splitlines():
        wnid, _, text = line.partition(" ")
        words[wnid] = text
    return words


def is_image_name(name: str) -> bool:
    """Whether a file name has an image extension (.JPEG, .jpg, .png, ..., any case): the files lists and resize
    take."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


# ---------------------------------------------------------------------------------------------
# Reading lists


@dataclass
class ImageList:
    """A parsed list: paths exactly as written (after normalisation) and int32 labels.

    Paths live in one Python list and labels in a numpy array so that 1.28M lines stay
    around 150 MB.
    """

    paths: list[str]
    labels: np.ndarray
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


def _bad(problems: list[str], lineno: int, reason: str, text: str) -> None:
    problems.append(f"line {lineno}: {reason}: {text[:120]!r}")


def read_list(path: str | os.PathLike, num_labels: int | None = None,
              allow_outside_root: bool = False) -> ImageList:
    """Parses a Caffe image list and refuses it, naming the lines, if any line is bad.

    Caffe splits each line at its last space and trims nothing, so a CR or a trailing blank
    silently becomes part of the label. Here line endings (LF, CRLF), a UTF-8 BOM and trailing
    blanks are normalised away (counted in `notes`); blank lines are skipped; everything else
    that is not `path label` with 0 <= label (< num_labels) is an error. Labels are kept as int32,
    so 1.28M lines need about 100 bytes each; while a plain list is checked on its whole text, the
    file's bytes and text are held too (about 90 MB more for ImageNet's train list).
    """
    notes = []
    paths: list[str] = []
    labels = array("i")
    problems: list[str] = []
    trimmed = blank = 0
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ImgprepError(f"cannot read list {path}: {e.strerror}") from None
    with f:
        clean = _read_clean(f, num_labels, allow_outside_root)
        if clean is not None:
            return clean
        f.seek(0)
        for lineno, raw_bytes in enumerate(f, 1):
            raw = raw_bytes.decode(**LIST_ENCODING).rstrip("\n")
            if lineno == 1 and raw.startswith("\ufeff"):
                raw = raw[1:]
                notes.append("removed a UTF-8 byte-order mark")
            line = raw.rstrip(" \t\r")
            if line != raw:
                trimmed += 1
            if not line.strip():
                blank += 1
                continue
            problem = _check_line(line, num_labels, allow_outside_root)
            if problem:
                _bad(problems, lineno, problem, raw)
                continue
            name, _, label_text = line.rpartition(" ")
            paths.append(name)
            labels.append(int(label_text))
    problems += _duplicates(paths)
    if problems:
        shown = "\n  ".join(problems[:SHOWN])
        more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        raise ImgprepError(f"{path}: {len(problems)} bad line{'' if len(problems) == 1 else 's'}:\n  {shown}{more}")
    if trimmed:
        notes.append(f"normalised {trimmed} line{'' if trimmed == 1 else 's'} with CR or trailing blanks")
    if blank:
        notes.append(f"skipped {blank} blank line{'' if blank == 1 else 's'}")
    return ImageList(paths, np.frombuffer(labels, dtype=np.int32), notes)


def _read_clean(f, num_labels: int | None, allow_outside_root: bool) -> ImageList | None:
    """The list, when every line is plain `path label` that read_list's line-by-line checks would pass
    unchanged, checked on the whole text at once; None otherwise (read_list then checks each line
    and names the bad ones). A file of 1.28 million lines takes about 1 s here, 7 s line by line,
    and every shard of a sharded build parses the whole list."""
    data = f.read()
    bom = data.startswith(b"\xef\xbb\xbf")
    text = data[3 if bom else 0:].decode(**LIST_ENCODING)
    if not text.endswith("\n") or any(c in text for c in ("\0", "\r", " \n", "\t\n", "\n\n", "..")):
        return None  # NUL, CR, trailing blanks, blank lines, a last line without LF, `..`: line by line
    if not allow_outside_root and (text.startswith("/") or "\n/" in text):
        return None
    parts = [line.rpartition(" ") for line in text[:-1].split("\n")]
    names = [name for name, _, _ in parts]  # "" where a line has no space: refused below
    label_texts = [label for _, _, label in parts]
    del parts
    digits = "".join(label_texts)
    if not (all(names) and all(label_texts) and digits.isascii() and digits.isdigit()
            and max(map(len, label_texts)) <= 10):  # longer ones cannot fit int32 (int64 could overflow)
        return None
    labels = np.array(list(map(int, label_texts)), dtype=np.int64)
    if labels.max() > INT32_MAX or (num_labels is not None and labels.max() >= num_labels):
        return None
    paths = names
    if "//" in text or "/." in text or "/ " in text or text.startswith(".") or "\n." in text:
        return None  # names that normpath would change: the duplicate check compares their normal forms
    if len(set(paths)) != len(paths):
        return None
    return ImageList(paths, labels.astype(np.int32), ["removed a UTF-8 byte-order mark"] if bom else [])


def _check_line(line: str, num_labels: int | None, allow_outside_root: bool) -> str | None:
    """What is wrong with one normalised, non-blank list line, or None."""
    name, sep, label_text = line.rpartition(" ")
    if not sep or not name:
        return "missing label (expected 'path label', separated by a space)"
    if "\0" in name:
        return "path contains a NUL byte, which no file name can hold"
    if "\r" in name:
        return "path contains a carriage return: a list with old Mac (CR-only) line ends? Save it with LF line ends"
    if not LABEL_RE.fullmatch(label_text):
        return f"label {label_text!r} is not an integer"
    label = int(label_text)
    if label < 0:
        return f"negative label {label}"
    if label > INT32_MAX:
        return f"label {label} does not fit Caffe's int32 label"
    if num_labels is not None and label >= num_labels:
        return f"label {label} out of range 0..{num_labels - 1}"
    if not allow_outside_root:
        if posixpath.isabs(name) or os.path.isabs(name):
            return "absolute path (use --allow-outside-root to accept)"
        if posixpath.normpath(name.replace("\\", "/")).startswith("../") or name == "..":
            return "path escapes the image root (use --allow-outside-root)"
    return None


def _duplicates(paths: list[str]) -> list[str]:
    """Entries naming one file twice, also under aliases (`d/./x`, `d//x`, `d/../d/x` beside `d/x`).
    Sorting references costs 8 bytes an entry (a dict would cost ~100); a normalised copy is kept
    only for the rare path that differs from its normal form."""
    keys = [_normal(name) for name in paths]
    ordered = sorted(keys)
    repeated = {a for a, b in zip(ordered, ordered[1:]) if a == b}
    if not repeated:
        return []
    first_entry: dict[str, int] = {}
    problems = []
    for entry, (name, key) in enumerate(zip(paths, keys), 1):
        if key in repeated:
            if key in first_entry:
                first = first_entry[key]
                alias = "" if paths[first - 1] == name else f" ({paths[first - 1][:120]!r})"
                problems.append(f"entry {entry}: duplicate of entry {first}{alias}: {name[:120]!r}")
            else:
                first_entry[key] = entry
    return problems


def _normal(name: str) -> str:
    """The path with `.`, `..` and repeated slashes resolved (the same string object when nothing
    changes; the test before normpath skips it for almost every real path)."""
    if "//" in name or "/." in name or name.startswith(".") or name.endswith("/"):
        normal = posixpath.normpath(name)
        return name if normal == name else normal
    return name


def write_list(path: str | os.PathLike, entries) -> int:
    """Writes `path label` lines; refuses paths a Caffe list cannot represent."""
    count = 0
    with open(path, "w", newline="\n", **LIST_ENCODING) as f:
        for name, label in entries:
            if "\n" in name or "\r" in name:
                raise ImgprepError(f"file name {name!r} contains a line break; a list cannot hold it "
                                   "(rename the file)")
            f.write(f"{name} {label}\n")
            count += 1
    return count


# ---------------------------------------------------------------------------------------------
# make-lists

