"""The loader's policies: their draws against the documented formulas, and their images against numpy
references, in DALI's CPU mode (IMGPREP_TEST_DEVICE=gpu runs the loader cases through the GPU graph)."""

import math
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from conftest import index_labelled_dbs
from imgprep import ImgprepError
from imgprep.formats.codec import decode_datum, encode_blob
from imgprep.loading.draws import (LANES, PCA_EIGVAL, PCA_EIGVEC, augmentation, lighting, normals, resized_crop_windows,
                                   shorter_sides)
from imgprep.formats.imageops import decode_to_rgb
from imgprep.formats.order import uniform
from imgprep.loading.loader import Loader, UpscaleWarning
from imgprep.loading.policies import policy
from imgprep.formats.storage import Reader

from test_order import MASK, reference_mix

DEVICE = os.environ.get("IMGPREP_TEST_DEVICE", "cpu")
pytestmark = pytest.mark.filterwarnings("ignore::imgprep.loading.loader.UpscaleWarning")  # the 256-records here, on purpose


@pytest.fixture(scope="module")
def dbs(sample_tree, tmp_path_factory):
    """30 records, labelled by their list index: raw squash-256 (BGR planar) and shorter-256 JPEG."""
    return index_labelled_dbs(sample_tree, tmp_path_factory.mktemp("policydbs"), (
        ("raw", "squash:256x256", False, "lmdb"), ("encoded", "shorter:256", True, "lmdb")), limit=30, jobs=1, seed=3)


def stored(db):
    """{label: (upright RGB HWC uint8, datum)} as stored."""
    out = {}
    with Reader(db) as reader:
        for _, value in reader.items():
            datum = decode_datum(value)
            rgb = decode_to_rgb(datum.data) if datum.encoded else datum.pixels()[::-1].transpose(1, 2, 0)
            out[datum.label] = (rgb, datum)
    return out


def first_batch(db, batch=8, **kwargs):
    args = dict(batch_size=batch, device=DEVICE, num_threads=1, normalize="none", layout="NHWC", shuffle=False)
    with Loader(db, **{**args, **kwargs}) as loader:
        images, labels = next(iter(loader))
    return np.asarray(images, np.float32), labels.tolist()


def reference_uniform(seed, epoch, position, lane):
    """The documented u(p, lane) in plain Python integers."""
    stream = reference_mix((reference_mix(seed & MASK) + epoch) & MASK)
    return (reference_mix((reference_mix(stream ^ position) + lane + 1) & MASK) >> 11) / 2**53


# --- the draws -----------------------------------------------------------------------------------

def test_uniforms_are_the_documented_lanes():
    positions = np.array([0, 5, 10**6])
    for lane in (0, 3, 4, 16, 35):
        expected = [reference_uniform(7, 2, p, lane) for p in positions.tolist()]
        assert uniform(7, 2, positions, lane).tolist() == expected
    assert uniform(7, 2, positions, (0, 3)).tolist() == [uniform(7, 2, positions, 0).tolist(),
                                                        uniform(7, 2, positions, 3).tolist()]
    assert sorted(LANES.values()) == [0, 1, 2, 3, 4, 16]  # the numbers are the documented ones


def test_scale_is_uniform_over_the_integers_256_to_480():
    """Chi-square over 9 bins of 25 sizes each (45,000 draws, fixed seed): below the 0.1% critical value."""
    sides = shorter_sides(0, 0, np.arange(45_000), 256, 480)
    assert sides.min() == 256 and sides.max() == 480 and sides.dtype == np.int64
    counts = np.bincount((sides - 256) // 25, minlength=9)
    expected = len(sides) / 9
    assert ((counts - expected) ** 2 / expected).sum() < 26.12  # chi2(df=8) at p = 0.001
    positions = np.array([3, 99])
    assert shorter_sides(4, 1, positions, 256, 480).tolist() == [
        256 + math.floor(reference_uniform(4, 1, p, 3) * 225) for p in positions.tolist()]


def test_mirror_frequency_and_crop_positions():
    crop_x, crop_y, mirror = augmentation(1, 0, np.arange(20_000))
    assert 0.49 < mirror.mean() < 0.51
    assert 0 <= crop_x.min() and crop_x.max() <= 1 and 0 <= crop_y.min() and crop_y.max() <= 1
    assert abs(float(crop_x.mean()) - 0.5) < 0.01


def test_lighting_normals_are_standard_and_the_offset_is_krizhevskys_formula():
    z = normals(2, 0, np.arange(20_000), 3)
    for column in z.T:  # Kolmogorov-Smirnov against N(0, 1): below the 1% critical value
        ordered = np.sort(column)
        cdf = 0.5 * (1 + np.vectorize(math.erf)(ordered / math.sqrt(2)))
        n = len(ordered)
        d = max((np.arange(1, n + 1) / n - cdf).max(), (cdf - np.arange(n) / n).max())
        assert d < 1.63 / math.sqrt(n)
    assert abs(np.corrcoef(z.T)[0, 1]) < 0.03
    for position in (0, 17):  # Box-Muller from the documented lanes, then 255 * eigvec @ (alpha * eigval)
        u = [reference_uniform(2, 0, position, lane) for lane in range(4, 8)]
        radius = [math.sqrt(-2 * math.log(1 - u[0])), math.sqrt(-2 * math.log(1 - u[2]))]
        alpha = 0.1 * np.array([radius[0] * math.cos(2 * math.pi * u[1]), radius[0] * math.sin(2 * math.pi * u[1]),
                                radius[1] * math.cos(2 * math.pi * u[3])])
        expected = 255 * PCA_EIGVEC @ (alpha * PCA_EIGVAL)
        np.testing.assert_allclose(lighting(2, 0, np.array([position]))[0], expected, rtol=1e-12, atol=1e-12)


def torchvision_get_params(width, height, seed, epoch, position, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision.transforms.RandomResizedCrop.get_params, its random numbers taken from the lanes."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for k in range(10):
        target_area = area * (scale[0] + reference_uniform(seed, epoch, position, 16 + 2 * k) * (scale[1] - scale[0]))
        u = reference_uniform(seed, epoch, position, 17 + 2 * k)
        aspect = math.exp(log_ratio[0] + u * (log_ratio[1] - log_ratio[0]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = math.floor(reference_uniform(seed, epoch, position, 1) * (height - h + 1))
            j = math.floor(reference_uniform(seed, epoch, position, 0) * (width - w + 1))
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def test_resized_crop_windows_are_torchvisions_algorithm_within_its_ranges():
    rng = np.random.default_rng(0)
    n = 3000
    heights = rng.integers(20, 600, n)
    widths = np.where(np.arange(n) % 10 == 0, heights * 9, rng.integers(20, 600, n))  # some too wide: fallback
    windows = resized_crop_windows(5, 3, np.arange(n), heights, widths)
    for p in range(0, n, 7):
        assert tuple(windows[p]) == torchvision_get_params(int(widths[p]), int(heights[p]), 5, 3, p)
    top, left, h, w = windows.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= heights).all() and (left + w <= widths).all()
    drawn = np.array([torchvision_get_params(int(widths[p]), int(heights[p]), 5, 3, p) != (
        (heights[p] - h[p]) // 2, (widths[p] - w[p]) // 2, h[p], w[p]) for p in range(n)])
    share, aspect = h * w / (heights * widths), w / h
    slack = 2 / np.minimum(h, w)  # w and h are rounded to whole pixels
    assert (share[drawn] > 0.08 * (1 - slack[drawn]) ** 2).all() and (share <= 1).all()
    assert (aspect > 3 / 4 * (1 - slack)).all() and (aspect < 4 / 3 * (1 + slack)).all()
    squarish = drawn & (np.abs(np.log(widths / heights)) < 0.2)
    assert 0.35 < np.median(share[squarish]) < 0.65


# --- the policies in the loader -------------------------------------------------------------------

def test_resnet_without_scale_and_lighting_is_the_caffe_policy(dbs):
    caffe, labels = first_batch(dbs["raw"], train=True, policy="caffe", seed=2)
    same, same_labels = first_batch(dbs["raw"], train=True, policy=policy("resnet", scale=None, lighting=0.0), seed=2)
    assert labels == same_labels and np.array_equal(caffe, same)


def test_pca_lighting_adds_the_drawn_offset_to_every_pixel(dbs):
    plain, labels = first_batch(dbs["raw"], train=True, policy=policy("resnet", scale=None, lighting=0.0), seed=4)
    lit, lit_labels = first_batch(dbs["raw"], train=True, policy=policy("resnet", scale=None), seed=4)
    offsets = lighting(4, 0, np.arange(len(labels)), 0.1)  # the first batch holds positions 0..B-1
    assert labels == lit_labels and np.abs(offsets).max() > 1.0
    for image, base, offset in zip(lit, plain, offsets):
        np.testing.assert_allclose(image - base, np.broadcast_to(offset, image.shape), atol=1e-3)
    bgr, _ = first_batch(dbs["raw"], train=True, policy=policy("resnet", scale=None), seed=4, channel_order="BGR")
    np.testing.assert_allclose(bgr, lit[..., ::-1], atol=1e-3)


def mirrored_crop(image, top, left, size_h, size_w, mirror):
    window = image[top:top + size_h, left:left + size_w]
    return window[:, ::-1] if mirror else window


def test_scale_augmentation_crops_the_image_resized_to_the_drawn_shorter_side(dbs):
    images, labels = first_batch(dbs["raw"], train=True, policy=policy("resnet", lighting=0.0), seed=6)
    records = stored(dbs["raw"])
    positions = np.arange(len(labels))
    sides = shorter_sides(6, 0, positions, 256, 480)
    crop_x, crop_y, mirror = augmentation(6, 0, positions)
    assert len(set(sides.tolist())) > 4
    for image, label, side, cx, cy, m in zip(images, labels, sides, crop_x, crop_y, mirror):
        resized = Image.fromarray(records[label][0]).resize((int(side), int(side)), Image.BILINEAR)
        resized = np.asarray(resized, np.float32)
        left, top = (int(np.floor(c * (side - 224) + 0.5)) for c in (cx, cy))  # DALI rounds halves up
        expected = mirrored_crop(resized, top, left, 224, 224, m)
        assert np.abs(image - expected).mean() < 3.0
        other = mirrored_crop(resized, top, left, 224, 224, not m)
        assert np.abs(image - other).mean() > np.abs(image - expected).mean()


def test_inception_resizes_the_drawn_window_to_224(dbs):
    images, labels = first_batch(dbs["encoded"], train=True, policy="inception", seed=8)
    records = stored(dbs["encoded"])
    positions = np.arange(len(labels))
    heights = [records[label][0].shape[0] for label in labels]
    widths = [records[label][0].shape[1] for label in labels]
    windows = resized_crop_windows(8, 0, positions, heights, widths)
    _, _, mirror = augmentation(8, 0, positions)
    assert images.shape == (len(labels), 224, 224, 3)
    for image, label, (top, left, h, w), m in zip(images, labels, windows, mirror):
        window = Image.fromarray(records[label][0][top:top + h, left:left + w]).resize((224, 224), Image.BILINEAR)
        expected = np.asarray(window, np.float32)[:, ::-1] if m else np.asarray(window, np.float32)
        assert np.abs(image - expected).mean() < 6.0, (label, (top, left, h, w))


def test_ten_crop_views_are_exact_corner_and_center_crops_and_their_mirrors(dbs):
    images, labels = first_batch(dbs["raw"], train=False, policy="ten-crop")
    records = stored(dbs["raw"])
    assert images.shape == (8, 10, 224, 224, 3)
    for views, label in zip(images, labels):
        rgb = records[label][0].astype(np.float32)  # 256x256: no resize
        five = [rgb[:224, :224], rgb[:224, 32:], rgb[32:, :224], rgb[32:, 32:], rgb[16:240, 16:240]]
        expected = np.stack(five + [v[:, ::-1] for v in five])
        assert np.array_equal(views, expected)
    nchw, _ = first_batch(dbs["raw"], train=False, policy="ten-crop", layout="NCHW", batch=2)
    assert nchw.shape == (2, 10, 3, 224, 224) and np.array_equal(nchw[0, 3], images[0, 3].transpose(2, 0, 1))


def test_ten_crop_keeps_the_evaluation_contract_across_ranks(dbs):
    seen = []
    for rank in range(4):  # 30 records over 4 ranks: two padding samples, labelled -1
        with Loader(dbs["encoded"], batch_size=4, train=False, policy="ten-crop", device=DEVICE, num_threads=1,
                    shard_id=rank, num_shards=4) as loader:
            for images, labels in loader:
                assert images.shape[:2] == (len(labels), 10)
                seen += labels.tolist()
    assert sorted(label for label in seen if label >= 0) == list(range(dbs["count"])) and seen.count(-1) == 2


def write_mean(path, mean_chw_bgr):
    path.write_bytes(encode_blob(mean_chw_bgr.astype(np.float32)))
    return path


def caffe_transform(datum_chw_bgr, mean, crop, h_off, w_off, mirror, scale=1.0):
    """Caffe's DataTransformer::Transform for a raw Datum, as written there: top[c][h][w'] =
    (datum[c][h_off+h][w_off+w] - mean[...]) * scale, w' = crop-1-w when mirrored; a stored-size mean
    is read at the source pixel, a per-channel mean value per channel."""
    out = np.zeros((3, crop, crop), np.float32)
    for c in range(3):
        for h in range(crop):
            source = datum_chw_bgr[c, h_off + h, w_off:w_off + crop].astype(np.float32)
            if mean.ndim == 3:
                source = source - mean[c, h_off + h, w_off:w_off + crop]
            else:
                source = source - mean[c]
            out[c, h] = (source[::-1] if mirror else source) * scale
    return out


def test_bgr_0_255_output_is_caffes_transform(dbs, tmp_path):
    """channel_order='BGR' with a mean file or mean values and std 1 gives what Caffe's transform_param
    gives a converted Caffe model: BGR planar, 0..255, mean subtracted."""
    records = stored(dbs["raw"])
    mean256 = np.random.default_rng(0).uniform(0, 255, (3, 256, 256)).astype(np.float32)
    mean224 = np.random.default_rng(1).uniform(0, 255, (3, 224, 224)).astype(np.float32)
    means = {"stored": write_mean(tmp_path / "m256.binaryproto", mean256),
             "values": ((123.68, 116.78, 103.94), (1.0,))}  # RGB order, as every normalize= mean
    for name, normalize in means.items():
        images, labels = first_batch(dbs["raw"], batch=4, train=False, policy="center", channel_order="BGR",
                                     normalize=normalize, layout="NCHW")
        for image, label in zip(images, labels):
            mean = mean256 if name == "stored" else np.array([103.94, 116.78, 123.68])
            expected = caffe_transform(records[label][1].pixels(), mean, 224, 16, 16, False)
            np.testing.assert_allclose(image, expected, atol=1e-3)
    crop_mean = write_mean(tmp_path / "m224.binaryproto", mean224)
    images, labels = first_batch(dbs["raw"], batch=6, train=True, policy="caffe", channel_order="BGR",
                                 normalize=crop_mean, layout="NCHW", seed=1)
    crop_x, crop_y, mirror = augmentation(1, 0, np.arange(6))
    for image, label, cx, cy, m in zip(images, labels, crop_x, crop_y, mirror):
        h_off, w_off = (int(np.floor(c * 32 + 0.5)) for c in (cy, cx))
        expected = caffe_transform(records[label][1].pixels(), np.zeros(3), 224, h_off, w_off, m)
        # caffe-pro's crop-sized mean, subtracted at the output position
        np.testing.assert_allclose(image, expected - mean224, atol=1e-3)
    rgb, _ = first_batch(dbs["encoded"], batch=4, train=False)
    bgr, _ = first_batch(dbs["encoded"], batch=4, train=False, channel_order="BGR")
    assert np.array_equal(bgr, rgb[..., ::-1])


def test_a_policy_that_upscales_the_records_warns_once(dbs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Loader(dbs["encoded"], batch_size=4, device=DEVICE, num_threads=1, policy="resnet") as loader:
            next(iter(loader))
            next(iter(loader))
        with Loader(dbs["encoded"], batch_size=4, device=DEVICE, num_threads=1, policy="inception"):
            pass
    upscaling = [w for w in caught if issubclass(w.category, UpscaleWarning)]
    assert len(upscaling) == 1 and "up to 480" in str(upscaling[0].message) and "resnet480" in str(upscaling[0].message)


def test_restarts_reproduce_every_policys_draws(dbs):
    for name in ("resnet", "inception"):
        with Loader(dbs["encoded"], batch_size=4, device=DEVICE, num_threads=1, policy=name, seed=3) as loader:
            whole = [images for images, _ in loader]
        with Loader(dbs["encoded"], batch_size=4, device=DEVICE, num_threads=1, policy=name, seed=3) as loader:
            loader.load_state_dict({**loader.state_dict(), "step": 5})
            resumed = [images for images, _ in loader]
        assert all(np.array_equal(a, b) for a, b in zip(whole[5:], resumed)) and len(resumed) == len(whole) - 5


def test_policy_mistakes_are_clear_errors(dbs, tmp_path):
    with pytest.raises(ImgprepError, match="unknown policy 'alexnet'"):
        Loader(dbs["raw"], device=DEVICE, policy="alexnet")
    with pytest.raises(ImgprepError, match="evaluation policy: use it with train=False"):
        Loader(dbs["raw"], device=DEVICE, policy="ten-crop")
    with pytest.raises(ImgprepError, match="training policy: use it with train=True"):
        Loader(dbs["raw"], device=DEVICE, train=False, policy="resnet")
    with pytest.raises(ImgprepError, match="needs 224 <= low"):
        policy("resnet", scale=(200, 480))
    with pytest.raises(ImgprepError, match="'inception' takes no scale"):
        policy("inception", scale=(256, 480))
    with pytest.raises(ImgprepError, match="only a 224x224 mean"):
        Loader(dbs["raw"], device=DEVICE, policy="resnet",
               normalize=write_mean(tmp_path / "m.binaryproto", np.zeros((3, 256, 256))))
    with pytest.raises(ImgprepError, match="channel_order"):
        Loader(dbs["raw"], device=DEVICE, channel_order="GBR")


def test_a_record_without_an_image_header_is_named_by_key_under_inception(dbs, tmp_path):
    """RandomResizedCrop reads each record's image size from its header; a record without one is named."""
    from imgprep.formats.codec import encode_datum
    from imgprep.formats.storage import open_writer

    with Reader(dbs["encoded"]) as reader:
        good = list(reader.items())[:6]
    writer = open_writer(tmp_path / "db", "lmdb")
    writer.put_batch(good[:3] + [(b"00000003_broken.JPEG", encode_datum(b"not an image" * 30, 0, 3, 256, 256, True))])
    writer.close()
    with pytest.raises(ImgprepError, match="00000003_broken.JPEG"):
        with Loader(tmp_path / "db", batch_size=4, device=DEVICE, num_threads=1, policy="inception") as loader:
            list(loader)


def test_augmentation_follows_the_documented_algorithm():
    for seed, epoch in [(0, 0), (9, 4), (-1, 2)]:
        positions = np.array([0, 1, 77, 10**6])
        crop_x, crop_y, mirror = augmentation(seed, epoch, positions)
        stream = reference_mix((reference_mix(seed & MASK) + epoch) & MASK)
        for n, p in enumerate(positions.tolist()):
            u = [(reference_mix((reference_mix(stream ^ p) + lane + 1) & MASK) >> 11) / 2**53 for lane in range(3)]
            assert (crop_x[n], crop_y[n], mirror[n]) == (np.float32(u[0]), np.float32(u[1]), int(u[2] < 0.5))
