"""Every random draw of the loader's and the Dataset's policies: pure functions of (seed, epoch,
position), so a restarted run, another rank or another machine draws the same crop, mirror, scale,
window and lighting for the same sample.

Every draw is a uniform of `imgprep.formats.order.uniform`, the stream beside the permutation:

    stream     = mix(mix(seed) + epoch)
    u(p, lane) = (mix(mix(stream ^ p) + lane + 1) >> 11) / 2**53        in [0, 1)

and `LANES` below names what each lane is drawn for (the one place the lane numbers are given):
0 crop x, 1 crop y, 2 mirror (u < 0.5), 3 the shorter side of scale augmentation, 4..7 the
lighting's normals, 16 + 2k and 17 + 2k the area and aspect ratio of RandomResizedCrop's attempt
k (k = 0..9). The numbers are part of the reproducibility promise: they never change.
"""

from __future__ import annotations

import math

import numpy as np

from imgprep.formats.order import uniform

# Krizhevsky et al.'s PCA of ImageNet's RGB pixels (0..1 scale), as fb.resnet.torch uses it
PCA_EIGVAL = np.array([0.2175, 0.0188, 0.0045])
PCA_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                       [-0.5808, -0.0045, -0.8140],
                       [-0.5836, -0.6948, 0.4203]])
ATTEMPTS = 10  # RandomResizedCrop's attempts
# lane numbers of u(p, lane), by what they draw: the first lane of each (the lighting and
# RandomResizedCrop take the lanes after theirs too: 4..7, 16..35)
LANES = {"crop_x": 0, "crop_y": 1, "mirror": 2, "shorter": 3, "lighting": 4, "resized_crop": 16}


def augmentation(seed: int, epoch: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training crop positions and mirror flags for `positions` of epoch `epoch`'s padded sequence:
    crop_x = u(p, 0), crop_y = u(p, 1) (as float32, DALI's crop_pos_x/y), mirror = u(p, 2) < 0.5 (int32).

    A pure function of (seed, epoch, position), so a restarted run draws the same crops and mirrors."""
    crop_x, crop_y, mirror = uniform(seed, epoch, positions, (LANES["crop_x"], LANES["crop_y"], LANES["mirror"]))
    return crop_x.astype(np.float32), crop_y.astype(np.float32), (mirror < 0.5).astype(np.int32)


def shorter_sides(seed: int, epoch: int, positions: np.ndarray, low: int, high: int) -> np.ndarray:
    """Scale augmentation: the shorter side, an integer uniform in [low, high] (both included, as
    fb.resnet.torch's torch.random(low, high)): low + floor(u(p, 3) * (high - low + 1))."""
    u = uniform(seed, epoch, positions, LANES["shorter"])
    return (low + np.floor(u * (high - low + 1))).astype(np.int64)


def normals(seed: int, epoch: int, positions: np.ndarray, count: int = 3) -> np.ndarray:
    """(len(positions), count) standard normals by Box-Muller from lanes 4, 5, ...: pair j uses
    u1 = u(p, 4 + 2j), u2 = u(p, 5 + 2j) and gives sqrt(-2 ln(1 - u1)) * (cos, sin)(2 pi u2)."""
    pairs = -(-count // 2)
    u = uniform(seed, epoch, positions, range(LANES["lighting"], LANES["lighting"] + 2 * pairs))
    u1, u2 = u[0::2], u[1::2]  # (pairs, n) each
    radius = np.sqrt(-2.0 * np.log1p(-u1))
    angle = 2 * np.pi * u2
    out = np.empty((pairs, 2, u.shape[1]))
    out[:, 0], out[:, 1] = radius * np.cos(angle), radius * np.sin(angle)
    return np.ascontiguousarray(out.reshape(2 * pairs, -1)[:count].T)  # (n, count), as matmul got it


def lighting(seed: int, epoch: int, positions: np.ndarray, std: float = 0.1) -> np.ndarray:
    """Krizhevsky's PCA lighting as an RGB offset per sample, in 0..255 pixels: with alpha =
    std * normals(...) (one per eigenvector), offset = 255 * PCA_EIGVEC @ (alpha * PCA_EIGVAL).
    The offset is added to every pixel of the sample (shape (len(positions), 3), float64)."""
    alpha = std * normals(seed, epoch, positions, 3)
    return 255.0 * (alpha * PCA_EIGVAL) @ PCA_EIGVEC.T


def resized_crop_windows(seed: int, epoch: int, positions: np.ndarray, heights: np.ndarray, widths: np.ndarray,
                         scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """torchvision's RandomResizedCrop.get_params, drawn from lanes: (top, left, height, width) per
    sample, int64 (len(positions), 4). Attempt k = 0..9 of a W x H image:

        area  = W * H * (scale[0] + u(p, 16 + 2k) * (scale[1] - scale[0]))
        r     = exp(log(ratio[0]) + u(p, 17 + 2k) * (log(ratio[1]) - log(ratio[0])))
        w, h  = round(sqrt(area * r)), round(sqrt(area / r))        (round half to even, as Python's)

    and the first attempt with 0 < w <= W and 0 < h <= H is taken, at top = floor(u(p, 1) * (H - h + 1)),
    left = floor(u(p, 0) * (W - w + 1)). When all ten fail, torchvision's fallback: the center crop of
    the whole image, its aspect ratio clamped into `ratio`."""
    positions = np.asarray(positions)
    heights, widths = np.asarray(heights, np.int64), np.asarray(widths, np.int64)
    n = len(positions)
    # all ten attempts of every sample at once (rows), with the window's position (lanes 0 and 1): on a
    # batch, fewer numpy calls cost less than computing only the attempts that are needed
    lane = LANES["resized_crop"]
    u = uniform(seed, epoch, positions, (LANES["crop_x"], LANES["crop_y"], *range(lane, lane + 2 * ATTEMPTS)))
    u_left, u_top = u[0], u[1]
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    area = (heights * widths)[None, :] * (scale[0] + u[2::2] * (scale[1] - scale[0]))  # (attempts, n)
    r = np.exp(log_lo + u[3::2] * (log_hi - log_lo))
    w, h = np.rint(np.sqrt(area * r)).astype(np.int64), np.rint(np.sqrt(area / r)).astype(np.int64)
    fits = (w > 0) & (w <= widths) & (h > 0) & (h <= heights)
    found = fits.any(axis=0)
    first = fits.argmax(axis=0)  # the first attempt that fits (0 where none does)
    columns = np.arange(n)
    out = np.zeros((n, 4), np.int64)
    out[:, 2], out[:, 3] = h[first, columns], w[first, columns]
    # the fallback, where no attempt fitted
    rest = ~found
    if rest.any():
        in_ratio = widths / heights
        fw, fh = widths.copy(), heights.copy()
        narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
        fh[narrow] = np.rint(fw[narrow] / min(ratio)).astype(np.int64)
        fw[wide] = np.rint(fh[wide] * max(ratio)).astype(np.int64)
        out[rest, 2], out[rest, 3] = fh[rest], fw[rest]
    top = np.floor(u_top * (heights - out[:, 2] + 1)).astype(np.int64)
    left = np.floor(u_left * (widths - out[:, 3] + 1)).astype(np.int64)
    out[:, 0] = np.where(found, top, (heights - out[:, 2]) // 2)
    out[:, 1] = np.where(found, left, (widths - out[:, 3]) // 2)
    return out

