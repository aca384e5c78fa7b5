import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

from conftest import index_labelled_dbs
from imgprep import ImgprepError  # noqa: E402
from imgprep.formats.manifest import MANIFEST
from imgprep.formats.codec import decode_datum, encode_blob, encode_datum  # noqa: E402
from imgprep.loading.dataset import CaffeDataset  # noqa: E402
from imgprep.formats.imageops import ImageSpec, decode_upright  # noqa: E402
from imgprep.formats.resizing import parse_resize
from imgprep.loading.policies import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB
from imgprep.formats.storage import Reader, open_writer  # noqa: E402

RECORDS = 40


@pytest.fixture(scope="module")
def dbs(sample_tree, tmp_path_factory):
    """Databases of RECORDS plain sample images whose label is the entry's index, so labels identify
    records; `sources` maps label -> source file."""
    return index_labelled_dbs(sample_tree, tmp_path_factory.mktemp("datasetdbs"), (
        ("encoded", "shorter:256", True, "lmdb"), ("encoded_leveldb", "shorter:256", True, "leveldb"),
        ("originals", "none", True, "lmdb"), ("raw", "squash:256x256", False, "lmdb"),
        ("raw_shorter", "shorter:256", False, "lmdb")), limit=RECORDS)


def stored_rgb(db):
    """label -> (H, W, 3) float32 RGB as stored (raw records)."""
    with Reader(db) as reader:
        datums = [decode_datum(v) for _, v in reader.items()]
    return {d.label: d.pixels()[::-1].transpose(1, 2, 0).astype(np.float32) for d in datums}


def all_items(dataset, workers=2, **kwargs):
    """label -> HWC image of one pass through a DataLoader with `workers` workers."""
    out = {}
    for images, labels in DataLoader(dataset, batch_size=8, num_workers=workers, **kwargs):
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        for image, label in zip(images, labels):
            assert int(label) not in out
            out[int(label)] = image.numpy().transpose(1, 2, 0)
    return out


def find_crop(source, out, atol=0.01):
    """(top, left, mirrored) with mirror(source[top:top+h, left:left+w]) == out, else None."""
    h, w = out.shape[:2]
    for mirrored in (False, True):
        corner = out[0, -1] if mirrored else out[0, 0]
        for top, left in zip(*np.nonzero(np.abs(source[:source.shape[0] - h + 1, :source.shape[1] - w + 1] - corner)
                                         .max(axis=2) <= atol)):
            crop = source[top:top + h, left:left + w]
            if np.abs((crop[:, ::-1] if mirrored else crop) - out).max() <= atol:
                return top, left, mirrored
    return None


def test_every_record_exactly_once_per_epoch_through_two_workers(dbs):
    dataset = CaffeDataset(dbs["encoded"], train=True)
    loader = DataLoader(dataset, batch_size=8, shuffle=True, num_workers=2)
    for epoch in range(2):
        dataset.set_epoch(epoch)
        batches = list(loader)
        assert batches[0][0].shape == (8, 3, 224, 224)
        assert sorted(int(l) for _, labels in batches for l in labels) == list(range(RECORDS))


def test_distributed_sampler_replicas_are_disjoint_and_complete(dbs):
    dataset = CaffeDataset(dbs["encoded"], train=True)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=3)
        sampler.set_epoch(1)
        seen.append([int(l) for _, labels in DataLoader(dataset, batch_size=8, sampler=sampler, num_workers=2)
                     for l in labels])
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(RECORDS))


RANK_SCRIPT = """
import json, os, sys
from torch.utils.data import DataLoader, DistributedSampler
from imgprep.loading.dataset import CaffeDataset
dataset = CaffeDataset(sys.argv[1])
sampler = DistributedSampler(dataset, num_replicas=2, rank=int(os.environ["RANK"]), shuffle=True, seed=0)
print(json.dumps([int(l) for _, labels in DataLoader(dataset, batch_size=8, sampler=sampler) for l in labels]))
"""


def test_two_processes_read_one_lmdb_at_once(dbs):
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(dbs["raw"])], stdout=subprocess.PIPE,
                              env={**os.environ, "RANK": str(rank)}) for rank in range(2)]
    a, b = (set(json.loads(p.communicate()[0])) for p in procs)
    assert not a & b and a | b == set(range(RECORDS))


def test_training_crops_lie_inside_the_image_and_mirror_about_half_the_time(dbs):
    stored = stored_rgb(dbs["raw"])
    dataset = CaffeDataset(dbs["raw"], train=True, normalize="none", seed=5)
    found = []
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for label, image in all_items(dataset).items():
            hit = find_crop(stored[label], image)
            assert hit is not None, f"training crop of record {label} is not a (mirrored) crop of it"
            found.append(hit)
    mirrored = sum(m for *_, m in found) / len(found)
    assert 0.35 < mirrored < 0.65, mirrored
    assert len({(top, left) for top, left, _ in found}) > len(found) // 2  # positions vary


def test_augmentation_depends_only_on_seed_epoch_and_index(dbs):
    """Persistent workers see set_epoch; the same (seed, epoch, index) gives the same image anywhere."""
    dataset = CaffeDataset(dbs["raw"], train=True, seed=9)
    loader = DataLoader(dataset, batch_size=8, shuffle=True, num_workers=2, persistent_workers=True)
    epochs = []
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        images = {}
        for batch, labels in loader:
            images.update({int(l): im for im, l in zip(batch, labels)})
        epochs.append(images)
    labels_by_index = {dataset[i][1]: i for i in range(len(dataset))}
    for label, image in epochs[1].items():
        assert torch.equal(image, dataset[labels_by_index[label]][0])  # main process, epoch 1
    assert sum(not torch.equal(epochs[0][k], epochs[1][k]) for k in epochs[0]) > RECORDS // 2
    other_seed = CaffeDataset(dbs["raw"], train=True, seed=10)
    assert not all(torch.equal(dataset[i][0], other_seed[i][0]) for i in range(4))


def test_center_crop_matches_numpy(dbs):
    for name in ("raw", "raw_shorter"):
        stored = stored_rgb(dbs[name])
        for label, image in all_items(CaffeDataset(dbs[name], train=False, normalize="none")).items():
            h, w = stored[label].shape[:2]
            top, left = (h - 224 + 1) // 2, (w - 224 + 1) // 2
            np.testing.assert_array_equal(image, stored[label][top:top + 224, left:left + 224])


def test_per_channel_normalisations_against_numpy(dbs):
    plain = all_items(CaffeDataset(dbs["encoded"], train=False, normalize="none"), workers=0)
    mean, std = np.array(IMAGENET_MEAN_RGB, np.float32), np.array(IMAGENET_STD_RGB, np.float32)
    imagenet = all_items(CaffeDataset(dbs["encoded"], train=False), workers=0)
    custom = all_items(CaffeDataset(dbs["encoded"], train=False, normalize=((100, 110, 120), (50, 60, 70))),
                       workers=0)
    for label, image in plain.items():
        np.testing.assert_allclose(imagenet[label], (image - mean) / std, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(custom[label], (image - [100, 110, 120]) / np.array([50, 60, 70]), atol=1e-5)


def write_mean(path, size, seed):
    mean_bgr = np.random.default_rng(seed).uniform(0, 255, (3, size, size)).astype(np.float32)
    path.write_bytes(encode_blob(mean_bgr))
    return path, mean_bgr[::-1].transpose(1, 2, 0)


def test_stored_size_mean_is_subtracted_at_the_source_pixel_before_crop_and_mirror(dbs, tmp_path):
    """Stock Caffe: out = mirror(crop(stored - mean256))."""
    path, mean_rgb = write_mean(tmp_path / "mean256.binaryproto", 256, seed=0)
    stored = stored_rgb(dbs["raw"])
    items = all_items(CaffeDataset(dbs["raw"], train=True, normalize=path, seed=1))
    assert sum(find_crop(stored[label] - mean_rgb, image) is not None for label, image in items.items()) == RECORDS
    assert {find_crop(stored[l], items[l]) for l in items} == {None}  # the mean was subtracted


def test_crop_size_mean_is_subtracted_at_the_output_position(dbs, tmp_path):
    """caffe-pro: out = mirror(crop(stored)) - mean224."""
    path, mean_rgb = write_mean(tmp_path / "mean224.binaryproto", 224, seed=1)
    stored = stored_rgb(dbs["raw"])
    items = all_items(CaffeDataset(dbs["raw"], train=True, normalize=path, seed=2))
    hits = [find_crop(stored[label], image + mean_rgb, atol=0.02) for label, image in items.items()]
    assert None not in hits and any(m for *_, m in hits)
    for label, image in all_items(CaffeDataset(dbs["raw"], train=False, normalize=path)).items():
        np.testing.assert_allclose(image, stored[label][16:240, 16:240] - mean_rgb, atol=1e-4)


def caffe_style_copy(db, out):
    """The records as Caffe's convert_imageset --encoded writes them: data, label, encoded; no
    channels/height/width."""
    writer = open_writer(out, "lmdb")
    with Reader(db) as reader:
        items = []
        for key, value in reader.items():
            datum = decode_datum(value)
            size = len(datum.data)
            varint = bytearray()
            while True:
                varint.append((size & 0x7F) | (0x80 if size > 0x7F else 0))
                size >>= 7
                if not size:
                    break
            items.append((key, b"\x22" + bytes(varint) + datum.data + bytes([0x28, datum.label, 0x38, 1])))
    writer.put_batch(items)
    writer.close()
    return out


def test_raw_and_encoded_records_give_the_pixels_of_the_decoded_source(dbs, tmp_path):
    caffe_encoded = caffe_style_copy(dbs["originals"], tmp_path / "caffe_encoded")
    with Reader(caffe_encoded) as reader:
        assert decode_datum(next(reader.items())[1]).channels == 0
    with Reader(dbs["originals"]) as reader:  # `--resize none --encoded` keeps upright RGB JPEGs byte for byte
        kept = {d.label for d in map(decode_datum, (v for _, v in reader.items()))
                if d.data == dbs["sources"][d.label].read_bytes()}
    assert len(kept) > RECORDS // 2
    spec = ImageSpec(parse_resize("shorter:256"))
    for db in (dbs["raw_shorter"], dbs["originals"], caffe_encoded):
        for label, image in all_items(CaffeDataset(db, train=False, normalize="none"), workers=0).items():
            source = np.asarray(decode_upright(dbs["sources"][label].read_bytes(), spec)[1], np.float32)
            h, w = source.shape[:2]
            top, left = (h - 224 + 1) // 2, (w - 224 + 1) // 2
            reference = source[top:top + 224, left:left + 224]
            if db == dbs["raw_shorter"] or label in kept:
                np.testing.assert_array_equal(image, reference, err_msg=str(db))
            else:  # re-encoded at q95
                assert np.abs(image - reference).mean() < 2.0


def test_leveldb_reads_in_one_process_and_refuses_several_workers(dbs):
    dataset = CaffeDataset(dbs["encoded_leveldb"], train=True)
    for workers in (0, 1):
        labels = [int(l) for _, batch in DataLoader(dataset, batch_size=8, num_workers=workers) for l in batch]
        assert sorted(labels) == list(range(RECORDS))
        dataset.close()
    with pytest.raises(ImgprepError, match="LevelDB allows one process at a time.*num_workers=0 or 1"):
        list(DataLoader(dataset, batch_size=8, num_workers=2))


def test_incomplete_builds_are_refused_unless_allowed(dbs, tmp_path):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(dbs["raw"], partial)
    manifest = json.loads((partial / MANIFEST).read_text())
    (partial / MANIFEST).write_text(json.dumps({**manifest, "state": "building"}))
    with pytest.raises(ImgprepError, match="incomplete build.*--resume.*allow_partial=True"):
        CaffeDataset(partial)
    assert len(CaffeDataset(partial, allow_partial=True)) == RECORDS


def test_clear_errors(dbs, tmp_path):
    with pytest.raises(ImgprepError, match="does not exist"):
        CaffeDataset(tmp_path / "absent")
    with pytest.raises(ImgprepError, match="records of one size"):
        CaffeDataset(dbs["encoded"], normalize=write_mean(tmp_path / "m.binaryproto", 256, 0)[0])
    with pytest.raises(ImgprepError, match="mean file is 100x100"):
        CaffeDataset(dbs["raw"], normalize=write_mean(tmp_path / "m.binaryproto", 100, 0)[0])
    with pytest.raises(ImgprepError, match="2 means and 2 standard deviations for 3-channel"):
        CaffeDataset(dbs["raw"], normalize=((1, 2), (1, 2)))
    writer = open_writer(tmp_path / "junk", "lmdb")
    writer.put_batch([(b"a", b"\x0f not a datum")])
    writer.close()
    with pytest.raises(ImgprepError, match="does not hold Caffe Datum"):
        CaffeDataset(tmp_path / "junk")


def test_draw_follows_its_documented_formula():
    from imgprep.loading.dataset import draw

    def mix(x):
        z = (x + 0x9E3779B97F4A7C15) % 2**64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
        return z ^ (z >> 31)

    # the loader's draws (imgprep.loading.draws.augmentation) at position = index
    for seed, epoch, index in ((0, 0, 0), (5, 2, 7), (2**40, 89, 1_281_166)):
        stream = mix((mix(seed) + epoch) % 2**64)
        u = [(mix((mix(stream ^ index) + lane + 1) % 2**64) >> 11) / 2**53 for lane in range(3)]
        drawn = draw(seed, epoch, index)
        assert (drawn.x, drawn.y, drawn.mirror) == (float(np.float32(u[0])), float(np.float32(u[1])), u[2] < 0.5)


def test_inception_policy_resizes_the_drawn_window_of_the_stored_image(dbs):
    """RandomResizedCrop's window from `draws` at position = record index, resized to 224, mirrored by `draw`."""
    from PIL import Image

    from imgprep.loading.dataset import draw
    from imgprep.loading.draws import resized_crop_windows

    stored = stored_rgb(dbs["raw"])
    dataset = CaffeDataset(dbs["raw"], train=True, normalize="none", seed=4, policy="inception")
    dataset.set_epoch(2)
    shares = []
    for index in range(8):
        image, label = dataset[index]
        rgb = stored[label].astype(np.uint8)
        top, left, h, w = resized_crop_windows(4, 2, np.array([index]), [256], [256])[0].tolist()
        expected = np.asarray(Image.fromarray(rgb[top:top + h, left:left + w]).resize((224, 224), Image.BILINEAR),
                              np.float32)
        expected = expected[:, ::-1] if draw(4, 2, index).mirror else expected
        np.testing.assert_array_equal(image.numpy().transpose(1, 2, 0), expected)
        shares.append(h * w / 256 ** 2)
    assert len(set(shares)) > 4 and 0.08 <= min(shares) and max(shares) <= 1
    with pytest.raises(ImgprepError, match="not 'resnet'"):
        CaffeDataset(dbs["raw"], policy="resnet")


def test_the_dataset_takes_the_loaders_policy_values_and_reads_their_fields(dbs):
    """`policy=` is the loader's (a name or a policies.Policy): mirror=False keeps every drawn window
    unmirrored; what Pillow does not follow here is refused by name."""
    from imgprep.loading.dataset import draw
    from imgprep.loading.options import OptionError
    from imgprep.loading.policies import policy

    default = CaffeDataset(dbs["raw"], seed=3)
    unmirrored = CaffeDataset(dbs["raw"], seed=3, policy=policy("caffe", mirror=False))
    mirrors = [draw(3, 0, index).mirror for index in range(8)]
    assert any(mirrors) and not all(mirrors)
    for index, mirror in enumerate(mirrors):
        expected = default[index][0].flip(-1) if mirror else default[index][0]
        np.testing.assert_array_equal(unmirrored[index][0].numpy(), expected.numpy())
    with pytest.raises(OptionError, match="no PCA lighting"):
        CaffeDataset(dbs["raw"], policy=policy("caffe", lighting=0.1))
    with pytest.raises(OptionError, match="not 'ten-crop' with train=False"):
        CaffeDataset(dbs["raw"], train=False, policy=policy("ten-crop"))


@pytest.mark.parametrize("backend", ["lmdb", "leveldb"])
def test_a_database_rebuilt_with_overwrite_is_read_anew_while_a_handle_on_the_old_one_is_open(sample_tree, tmp_path,
                                                                                               backend):
    """build-lmdb --overwrite deletes a database's files and writes new ones: a CaffeDataset or Loader made
    afterwards reads the new database even where this process still holds the old one open, which keeps
    reading its own records (LevelDB, which allows one handle per process, says to close it first)."""
    from conftest import run_cli
    from imgprep.loading.loader import Loader

    db = tmp_path / "db"
    lists, root = sample_tree.lists, sample_tree.root

    def build(split, *flags):
        result = run_cli("build-lmdb", lists / f"{split}.txt", root / split, db, "--backend", backend, "--resize",
                         "squash:32x32", "--raw", "--jobs", "2", *flags, check=False)
        assert result.returncode in (0, 3), result.stderr  # 3: the sample's broken images are reported failures

    def stored_labels():
        with Reader(db) as reader:
            return sorted(decode_datum(v).label for _, v in reader.items())

    build("train")
    train_labels = stored_labels()
    old = CaffeDataset(db, crop=32, resize_shorter=32)
    first = old[0][1]
    build("val", "--overwrite")
    if backend == "leveldb":
        with pytest.raises(ImgprepError, match="rebuilt while this process still holds the old database open"):
            CaffeDataset(db, crop=32, resize_shorter=32)
        old.close()
    val_labels = stored_labels()
    assert len(val_labels) == json.loads((db / MANIFEST).read_text())["records"] != len(train_labels)
    new = CaffeDataset(db, crop=32, resize_shorter=32, normalize="none")
    assert len(new) == len(val_labels) and sorted(new[i][1] for i in range(len(new))) == val_labels
    with Loader(db, batch_size=8, train=False, crop=32, resize_shorter=32, device="cpu", num_threads=1) as loader:
        assert sorted(label for _, labels in loader for label in labels.tolist()) == val_labels
    if backend == "lmdb":
        assert len(old) == len(train_labels) and old[0][1] == first  # the old handle reads its own database


class ReadersOfEachItem(torch.utils.data.Dataset):
    """A CaffeDataset's items, with the process that read each one and the pids LMDB's reader table
    registers for a read in that process."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        _, label = self.dataset[index]
        reader = self.dataset._open_here()
        with reader.env.begin():
            table = reader.env.readers()
        return label, os.getpid(), [int(line.split()[0]) for line in table.splitlines()[1:]]


def test_dataloader_workers_forked_after_the_parent_read_open_their_own_lmdb_handle(dbs):
    """LMDB forbids using an environment across fork: a worker forked after the main process read items
    opens its own, so its reads are registered under its own pid, and the main process reads on."""
    from imgprep.loading.records import RecordSource

    dataset = CaffeDataset(dbs["raw"], train=False)
    dataset[0]  # the main process opens its handle
    items = list(DataLoader(ReadersOfEachItem(dataset), batch_size=None, num_workers=2,
                            multiprocessing_context="fork"))
    assert sorted(label for label, _, _ in items) == list(range(RECORDS))
    assert all(pid != os.getpid() and pid in pids for _, pid, pids in items)
    assert dataset[1][1] == items[1][0]
    source = RecordSource(dbs["raw"], "lmdb")  # an open Loader's read transaction: closing it in a child would end it
    try:
        with pytest.raises(ImgprepError, match="forked while its parent was reading the LMDB"):
            list(DataLoader(CaffeDataset(dbs["raw"], train=False), batch_size=8, num_workers=1,
                            multiprocessing_context="fork"))
    finally:
        source.close()
    leveldb = CaffeDataset(dbs["encoded_leveldb"], train=False)
    leveldb[0]
    with pytest.raises(ImgprepError, match="forked from one that holds the LevelDB open"):
        list(DataLoader(leveldb, batch_size=8, num_workers=1, multiprocessing_context="fork"))
    leveldb.close()
    assert len(list(DataLoader(leveldb, batch_size=8, num_workers=1, multiprocessing_context="fork"))) == 5


def test_loader_and_dataset_check_their_shared_arguments_alike(dbs, tmp_path):
    """One validation (imgprep.loading.options) for both: the same ValueError naming the argument. On a grayscale
    database the RGB default normalisation is refused by both, where the loader used to take the red mean."""
    from imgprep.loading.loader import Loader
    from imgprep.loading.options import OptionError

    gray = tmp_path / "gray"
    pixels = np.random.default_rng(0).integers(0, 256, (4, 1, 40, 40), dtype=np.uint8)
    writer = open_writer(gray, "lmdb")
    writer.put_batch([(b"%08d" % i, encode_datum(p.tobytes(), i, 1, 40, 40, False)) for i, p in enumerate(pixels)])
    writer.close()
    for db, kwargs, message in ((dbs["raw"], {"crop": 0}, "crop must be a whole number >= 1, not 0"),
                                (dbs["raw"], {"crop": 300}, "crop 300 is larger than resize_shorter 256"),
                                (dbs["raw"], {"seed": -1}, "seed must be a whole number >= 0"),
                                (gray, {"crop": 32, "resize_shorter": 40},
                                 r"normalize gives 3 means and 3 standard deviations for 1-channel records "
                                 r"\(the records are grayscale")):
        for make in (CaffeDataset, lambda db, **kw: Loader(db, device="cpu", **kw)):
            with pytest.raises(OptionError, match=message) as caught:
                make(db, train=False, **kwargs)
            assert isinstance(caught.value, ValueError)
    norm = ((100.0,), (50.0,))
    dataset = CaffeDataset(gray, train=False, crop=32, resize_shorter=40, normalize=norm)
    with Loader(gray, batch_size=4, train=False, crop=32, resize_shorter=40, normalize=norm, device="cpu") as loader:
        images, labels = next(iter(loader))
    expected = (pixels[:, :, 4:36, 4:36].astype(np.float32) - 100) / 50
    assert images.shape == (4, 1, 32, 32)
    np.testing.assert_allclose(images, expected[labels], atol=1e-5)
    np.testing.assert_allclose(np.stack([dataset[i][0].numpy() for i in range(4)]), expected, atol=1e-5)
