import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import index_labelled_dbs
from imgprep import ImgprepError
from imgprep.formats.codec import encode_blob
from imgprep.formats.imageops import center_crop, decode_to_rgb
from imgprep.loading.loader import Loader
from imgprep.loading.policies import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB
from imgprep.formats.storage import Reader
from imgprep.formats.codec import decode_datum


# The loader tests run in DALI's CPU mode here; on a GPU machine IMGPREP_TEST_DEVICE=gpu runs them
# through the GPU graph ('mixed' decoding, GPU crop/normalise) with the same assertions.
DEVICE = os.environ.get("IMGPREP_TEST_DEVICE", "cpu")
# On a GPU, JPEG pixels decoded in different places (the CPU, the GPU's hardware decoder, its CUDA decoder:
# DALI splits a batch between the last two by position) differ by their IDCTs' rounding (see Loader's
# docstring): labels and crops stay exact, pixels agree within this mean absolute difference (0..255).
GPU_DECODE_TOLERANCE = 1.0


def assert_same_decoded(a, b):
    """The same JPEG-decoded images: equal on the CPU; on a GPU within GPU_DECODE_TOLERANCE per image."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if DEVICE != "gpu":
        np.testing.assert_array_equal(a, b)
        return
    assert a.shape == b.shape
    for i, (x, y) in enumerate(zip(a.reshape(len(a), -1), b.reshape(len(b), -1))):
        assert np.abs(x - y).mean() < GPU_DECODE_TOLERANCE, f"image {i}: mean |difference| {np.abs(x - y).mean():.2f}"


@pytest.fixture(scope="module")
def dbs(sample_tree, tmp_path_factory):
    """Databases whose label is the entry's own index, so labels identify records."""
    return index_labelled_dbs(sample_tree, tmp_path_factory.mktemp("loaderdbs"), (
        ("encoded", "shorter:256", True, "lmdb"), ("encoded_leveldb", "shorter:256", True, "leveldb"),
        ("raw", "squash:256x256", False, "lmdb"), ("raw_leveldb", "squash:256x256", False, "leveldb"),
        ("raw_shorter", "shorter:256", False, "lmdb")))


def stored_rgb(db):
    """key-order list of (label, upright RGB HWC uint8) as stored."""
    out = []
    with Reader(db) as reader:
        for _, value in reader.items():
            datum = decode_datum(value)
            rgb = decode_to_rgb(datum.data) if datum.encoded else datum.pixels()[::-1].transpose(1, 2, 0)
            out.append((datum.label, rgb))
    return out


def epoch_labels(loader):
    labels = []
    for images, batch_labels in loader:
        assert images.shape[0] == batch_labels.shape[0]
        labels += batch_labels.tolist()
    return labels


@pytest.mark.parametrize("name", ["encoded", "encoded_leveldb", "raw", "raw_leveldb"])
def test_every_record_exactly_once_per_epoch(dbs, name):
    with Loader(dbs[name], batch_size=16, train=True, device=DEVICE, num_threads=2) as loader:
        assert loader.epoch_size == dbs["count"] and len(loader) == -(-dbs["count"] // 16)
        for _ in range(2):
            labels = epoch_labels(loader)
            assert sorted(labels) == list(range(dbs["count"]))


@pytest.mark.parametrize("name", ["encoded", "encoded_leveldb"])
def test_split_loader_interleaves_two_pipelines_over_the_same_order(dbs, name):
    """cpu_share: a second pipeline (CPU decoding; on a GPU, crop/normalise on the GPU) runs that share of
    the batches (step s when floor((s+1)*share) > floor(s*share)); the order and the images are unchanged."""
    with Loader(dbs[name], batch_size=8, train=True, device=DEVICE, cpu_share=0.4, cpu_threads=1) as split, \
            Loader(dbs[name], batch_size=8, train=True, device=DEVICE, normalize="none") as whole:
        assert len(split._streams) == 2 and len(split) == len(whole)
        for _ in range(2):
            ran, batches, before = [], [], split._streams[1].last
            for _, labels in split:
                ran.append(split._streams[1].last != before)  # the CPU-decoding pipeline gave this batch
                before = split._streams[1].last
                batches.append(labels.tolist())
            assert batches == [labels.tolist() for _, labels in whole]
            assert ran == [int((s + 1) * 0.4) > int(s * 0.4) for s in range(len(split))]
            assert sorted(sum(batches, [])) == list(range(dbs["count"]))
    with Loader(dbs["encoded"], batch_size=8, train=False, device=DEVICE, normalize="none", layout="NHWC") as whole, \
            Loader(dbs["encoded"], batch_size=8, train=False, device=DEVICE, normalize="none", layout="NHWC",
                   cpu_share=0.5) as split:
        for (a, la), (b, lb) in zip(whole, split):
            assert la.tolist() == lb.tolist()
            assert_same_decoded(a, b)  # half of these batches decoded on the CPU
    with pytest.raises(ImgprepError, match="raw records"):
        Loader(dbs["raw"], device=DEVICE, cpu_share=0.3)


def test_drop_last_keeps_epochs_aligned(dbs):
    with Loader(dbs["encoded"], batch_size=16, train=False, device=DEVICE, drop_last=True) as loader:
        first, second = epoch_labels(loader), epoch_labels(loader)
    assert len(first) == dbs["count"] // 16 * 16 and first == second


def test_eval_is_the_center_crop_of_the_shorter_256_image(dbs):
    stored = dict(stored_rgb(dbs["encoded"]))
    with Loader(dbs["encoded"], batch_size=8, train=False, device=DEVICE, normalize="none", layout="NHWC") as loader:
        runs = [list(zip(*next(iter(loader)))) for _ in range(1)]
        again = next(iter(loader))
    for image, label in runs[0]:
        reference = center_crop(stored[int(label)], 224).astype(np.float32)  # a half-pixel offset rounds up, as DALI's
        assert image.shape == (224, 224, 3)
        assert np.abs(image - reference).mean() < 1.0
        h, w = stored[int(label)].shape[:2]
        if (w - 224) % 2:  # Caffe's floored offset is a different crop
            caffe = stored[int(label)][(h - 224) // 2:(h - 224) // 2 + 224, (w - 224) // 2:(w - 224) // 2 + 224]
            assert np.abs(image - caffe).mean() > np.abs(image - reference).mean()
    assert again[0].shape == (8, 224, 224, 3)


def find_crop(stored, out, transform=lambda crop: crop, atol=0.51):
    """(y, x, mirrored) such that transform(mirror(stored[y:y+224, x:x+224])) == out, or None."""
    h, w = stored.shape[:2]
    for mirrored in (False, True):
        for y in range(h - 223):
            for x in range(w - 223):
                crop = stored[y:y + 224, x:x + 224]
                if mirrored:
                    crop = crop[:, ::-1]
                if abs(float(transform(crop, y, x, mirrored)[0, 0, 0]) - float(out[0, 0, 0])) > atol:
                    continue
                if np.abs(transform(crop, y, x, mirrored) - out).max() <= atol:
                    return y, x, mirrored
    return None


def test_training_crops_lie_inside_the_image_and_mirror_about_half_the_time(dbs):
    stored = dict(stored_rgb(dbs["raw"]))
    found = []
    with Loader(dbs["raw"], batch_size=32, train=True, device=DEVICE, normalize="none", layout="NHWC", seed=3) as loader:
        for images, labels in loader:
            for image, label in zip(images, labels):
                hit = find_crop(stored[int(label)].astype(np.float32), image, lambda c, *a: c)
                assert hit is not None, f"training crop of record {label} is not a (mirrored) crop of it"
                found.append(hit)
    mirrored = sum(m for _, _, m in found) / len(found)
    assert 0.3 < mirrored < 0.7, mirrored
    assert len({(y, x) for y, x, _ in found}) > len(found) // 2  # positions vary


def test_raw_encoded_and_leveldb_give_the_same_images(dbs):
    def eval_batches(name):
        with Loader(dbs[name], batch_size=200, train=False, device=DEVICE, normalize="none", layout="NHWC") as loader:
            images, labels = next(iter(loader))
        return {int(l): im for im, l in zip(images, labels)}

    lmdb_encoded, leveldb_encoded = eval_batches("encoded"), eval_batches("encoded_leveldb")
    assert lmdb_encoded.keys() == leveldb_encoded.keys()
    for label in lmdb_encoded:
        np.testing.assert_array_equal(lmdb_encoded[label], leveldb_encoded[label])
    raw = eval_batches("raw_shorter")
    assert np.mean([np.abs(raw[l] - lmdb_encoded[l]).mean() for l in raw]) < 2.0  # q95 JPEG vs raw pixels
    raw_lmdb, raw_leveldb = eval_batches("raw"), eval_batches("raw_leveldb")
    for label in raw_lmdb:
        np.testing.assert_array_equal(raw_lmdb[label], raw_leveldb[label])


def test_per_channel_normalisation_and_output_formats(dbs):
    with Loader(dbs["encoded"], batch_size=4, train=False, device=DEVICE, normalize="none") as loader:
        plain, _ = next(iter(loader))
    with Loader(dbs["encoded"], batch_size=4, train=False, device=DEVICE, dtype="float16") as loader:
        normalised, _ = next(iter(loader))
    assert plain.shape == (4, 3, 224, 224) and normalised.dtype == np.float16
    mean = np.array(IMAGENET_MEAN_RGB, np.float32).reshape(3, 1, 1)
    std = np.array(IMAGENET_STD_RGB, np.float32).reshape(3, 1, 1)
    np.testing.assert_allclose(normalised.astype(np.float32), (plain - mean) / std, atol=0.01)


def write_mean(path, mean_chw_bgr):
    path.write_bytes(encode_blob(mean_chw_bgr.astype(np.float32)))
    return path


def random_mean_training_batch(dbs, tmp_path, size, seed):
    """A random (non-symmetric) mean image of `size`, and a training batch normalised with it."""
    mean_bgr = np.random.default_rng(seed).uniform(0, 255, (3, size, size)).astype(np.float32)
    path = write_mean(tmp_path / f"mean{size}.binaryproto", mean_bgr)
    with Loader(dbs["raw"], batch_size=6, train=True, device=DEVICE, normalize=path, layout="NHWC", seed=5) as loader:
        images, labels = next(iter(loader))
    return mean_bgr, mean_bgr[::-1].transpose(1, 2, 0), path, images, labels


def test_stored_size_mean_is_subtracted_at_the_source_pixel_before_mirror(dbs, tmp_path):
    """Stock Caffe: out = mirror(crop(stored - mean))."""
    _, mean_rgb, _, images, labels = random_mean_training_batch(dbs, tmp_path, 256, seed=0)
    stored = dict(stored_rgb(dbs["raw"]))
    for image, label in zip(images, labels):
        source = stored[int(label)].astype(np.float32) - mean_rgb
        assert find_crop(source, image, lambda c, *a: c, atol=0.01) is not None


def test_crop_size_mean_is_subtracted_at_the_output_position(dbs, tmp_path):
    """caffe-pro: out = mirror(crop(stored)) - mean224."""
    mean_bgr, mean_rgb, path, images, labels = random_mean_training_batch(dbs, tmp_path, 224, seed=1)
    stored = dict(stored_rgb(dbs["raw"]))
    for image, label in zip(images, labels):
        hit = find_crop(stored[int(label)].astype(np.float32), image, lambda c, *a: c - mean_rgb, atol=0.01)
        assert hit is not None
    with Loader(dbs["raw"], batch_size=6, train=False, device=DEVICE, normalize=path) as loader:
        nchw, labels = next(iter(loader))
    expected = center_crop(stored[int(labels[0])], 224).transpose(2, 0, 1) - mean_bgr[::-1]
    np.testing.assert_allclose(nchw[0], expected, atol=0.01)


def test_clear_errors(dbs, tmp_path):
    with pytest.raises(ImgprepError, match="does not exist"):
        Loader(tmp_path / "absent", device=DEVICE)
    with pytest.raises(ImgprepError, match="mean file is 100x100"):
        Loader(dbs["raw"], device=DEVICE, normalize=write_mean(tmp_path / "m.binaryproto", np.zeros((3, 100, 100))))
    for varying in ("encoded", "raw_shorter"):  # shorter-side builds: records differ in size
        with pytest.raises(ImgprepError, match="records of one size"):
            Loader(dbs[varying], device=DEVICE, normalize=write_mean(tmp_path / "m2.binaryproto", np.zeros((3, 256, 256))))
    from imgprep.formats.storage import open_writer
    writer = open_writer(tmp_path / "junk", "lmdb")
    writer.put_batch([(b"a", b"\x0f not a datum")])
    writer.close()
    with pytest.raises(ImgprepError, match="does not hold Caffe Datum"):
        Loader(tmp_path / "junk", device=DEVICE)


SHARD_SCRIPT = """
import json, sys
from imgprep.loading.loader import Loader
with Loader(sys.argv[1], batch_size=8, train=True, device=sys.argv[2], num_threads=1) as loader:
    labels = []
    for _ in range(2):
        epoch = [l for _, batch in loader for l in batch.tolist()]
        labels.append(epoch)
print(json.dumps({"labels": labels, "shard": [loader.shard_id, loader.num_shards]}))
"""


def test_leveldb_shards_are_disjoint_and_complete(dbs):
    loaders = [Loader(dbs["raw_leveldb"], batch_size=8, device=DEVICE, shard_id=i, num_shards=3) for i in range(3)]
    seen = [epoch_labels(loader) for loader in loaders]
    for loader in loaders:
        loader.close()
    assert sorted(sum(seen, [])) == list(range(dbs["count"]))


@pytest.mark.parametrize("name", ["encoded", "raw"])
def test_shards_are_disjoint_and_complete_across_processes(dbs, name):
    procs = [subprocess.Popen([sys.executable, "-c", SHARD_SCRIPT, str(dbs[name]), DEVICE], stdout=subprocess.PIPE,
                              env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2"})
             for rank in range(2)]
    results = [json.loads(p.communicate()[0]) for p in procs]
    assert [r["shard"] for r in results] == [[0, 2], [1, 2]]
    for epoch in range(2):
        a, b = (set(r["labels"][epoch]) for r in results)
        assert not a & b and a | b == set(range(dbs["count"]))
        assert all(len(r["labels"][epoch]) == len(set(r["labels"][epoch])) for r in results)


def test_torch_output(dbs):
    torch = pytest.importorskip("torch")
    with Loader(dbs["raw_leveldb"], batch_size=8, train=True, device=DEVICE, output="torch", layout="NHWC",
                dtype="float16") as loader:
        images, labels = next(iter(loader))
    assert isinstance(images, torch.Tensor) and images.dtype == torch.float16 and images.shape == (8, 224, 224, 3)
    assert labels.dtype == torch.int64 and labels.shape == (8,)


JAX_OUTPUT = """
import sys
import jax.numpy as jnp
from imgprep.loading.loader import Loader

db, device, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
with Loader(db, batch_size=16, train=False, device=device, output="jax", normalize="none") as jax_loader:
    batches = list(jax_loader)
with Loader(db, batch_size=16, train=False, device=device, normalize="none") as numpy_loader:
    reference = list(numpy_loader)
assert len(batches) == len(reference) and isinstance(batches[0][0], type(jnp.zeros(1)))
assert batches[-1][0].shape[0] == count % 16 or batches[-1][0].shape[0] == 16
for (images, labels), (ref_images, ref_labels) in zip(batches, reference):
    assert (labels.tolist() == ref_labels.tolist()) and float(abs(images - ref_images).max()) == 0.0
print("same", len(batches))
"""


def test_jax_output(dbs):
    """In a process of its own: JAX starts threads, and the test process forks workers later."""
    pytest.importorskip("jax")
    result = subprocess.run([sys.executable, "-c", JAX_OUTPUT, str(dbs["encoded"]), DEVICE, str(dbs["count"])],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.startswith("same"), result.stderr[-3000:]


def graph_ops(*outputs):
    """{(operator name, device)} of every operator feeding `outputs` (inputs and argument inputs)."""
    seen, ops, todo = set(), set(), list(outputs)
    while todo:
        node = todo.pop()
        op = node.source
        if op is None or id(op) in seen:
            continue
        seen.add(id(op))
        ops.add((op._op._operator_name().removeprefix("nvidia.dali.fn."), op._op.device))
        todo += op._inputs
    return ops


# Where each input reaches the GPU: anything else on the CPU in a GPU graph is a placement mistake.
# The per-sample values are argument inputs, which DALI takes on the CPU: split off the feed's packed array
# (`_tensor_subscript`), the mirror flag cast to int32.
CPU_SIDE = {"external_source", "_tensor_subscript", "cast"}


@pytest.mark.parametrize("name", ["encoded", "encoded_leveldb", "raw", "raw_leveldb", "raw_shorter"])
@pytest.mark.parametrize("policy", ["caffe", "resnet", "inception", "center", "ten-crop"])
def test_gpu_graph_places_every_stage_after_the_reader_on_the_gpu(dbs, tmp_path, name, policy):
    """The GPU graph cannot run here, but DALI checks device placement while the graph is defined:
    every policy, every record kind, every normalisation, both channel orders."""
    from nvidia.dali import Pipeline
    from imgprep.loading.loader import _Feed
    from imgprep.loading.policies import Normalisation
    from imgprep.formats.database import database_info
    from imgprep.loading.plan import EpochPlan
    from imgprep.loading.graph import graph
    from imgprep.loading.policies import policy as make_policy
    from imgprep.loading.records import RecordSource

    info = database_info(dbs[name])
    made = make_policy(policy)
    norms = [Normalisation.parse("imagenet"), Normalisation.parse(((120.0,), (60.0,))),
             Normalisation.parse(write_mean(tmp_path / "m224.binaryproto", np.zeros((3, 224, 224))))]
    if info.stored_size == (256, 256) and policy not in ("resnet", "inception"):
        norms.append(Normalisation.parse(write_mean(tmp_path / "m256.binaryproto", np.zeros((3, 256, 256)))))
    cases = [(norm, cpu_decode, order) for norm in norms for cpu_decode in ((False, True) if info.encoded else (False,))
             for order in ("RGB", "BGR")]
    source = RecordSource(info.path, info.backend)
    try:
        for norm, cpu_decode, order in cases:
            feed = _Feed(EpochPlan(info.records, 8), source, lambda *a: [], 0, lambda step: 0)
            pipe = Pipeline(batch_size=8, num_threads=1, device_id=0)
            with pipe:
                images, labels = graph(info, made, norm, "float16", "NCHW", True, feed, decode_on_cpu=cpu_decode,
                                       channel_order=order)
            assert (images.device, labels.device) == ("gpu", "gpu")
            ops = graph_ops(images, labels)
            decoders = {op for op in ops if op[0].startswith("decoders.")}
            if info.encoded and not cpu_decode:
                assert decoders == {("decoders.image", "mixed")}
            elif info.encoded:  # the whole image, or only the crop window when no resize comes first
                assert decoders in ({("decoders.image", "cpu")}, {("decoders.image_crop", "cpu")}), decoders
            else:
                assert not decoders
            stray = {op for op in ops - decoders if op[1] == "cpu" and op[0] not in CPU_SIDE}
            assert not stray, f"CPU stages in the GPU graph ({name}, {policy}, cpu_decode={cpu_decode}): {stray}"
    finally:
        source.close()


# --- the order contract, with real processes -------------------------------------------------------

def key_order_labels(db):
    """Labels in key order: the loader's record i is the database's i-th key."""
    with Reader(db) as reader:
        return [decode_datum(value).label for _, value in reader.items()]


def plan_labels(db, epoch, **plan_args):
    """The labels of each batch the order contract promises, from imgprep.formats.order alone."""
    from imgprep.loading.plan import EpochPlan

    labels = key_order_labels(db)
    plan = EpochPlan(len(labels), **plan_args)
    out = []
    for step in range(plan.steps):
        records, _, real = plan.batch(epoch, step)
        out.append([labels[r] if ok else -1 for r, ok in zip(records.tolist(), real.tolist())])
    return out


@pytest.fixture(scope="module")
def uneven_db(dbs, tmp_path_factory):
    """101 records (a prime): divisible by no shard count or batch size the tests use."""
    from imgprep.formats.storage import open_writer

    path = tmp_path_factory.mktemp("uneven") / "db"
    writer = open_writer(path, "lmdb")
    writer.put_batch(db_values(dbs["encoded"])[:101])
    writer.close()
    return path


RANK_SCRIPT = """
import json, sys
from imgprep.loading.loader import Loader
db, device, train, batch = sys.argv[1], sys.argv[2], sys.argv[3] == "train", int(sys.argv[4])
with Loader(db, batch_size=batch, train=train, device=device, num_threads=1, seed=5) as loader:
    epochs = [[batch.tolist() for _, batch in loader] for _ in range(2)]
    print(json.dumps({"epochs": epochs, "len": len(loader), "shard": [loader.shard_id, loader.num_shards]}))
"""


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_uneven_shards_across_processes_run_equal_steps_with_the_promised_coverage(uneven_db, mode):
    """N divisible neither by K nor by the batch: every rank runs the same steps; training visits every
    record, repeating only the ceil(N/K)*K - N samples that even the ranks out; evaluation visits every
    record exactly once, with that many padding samples labelled -1."""
    db, k, batch = uneven_db, 4, 8
    labels = key_order_labels(db)
    n = len(labels)
    assert n % k and n % batch and -(-n // k) % batch  # uneven everywhere: a partial last batch on every rank
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(db), DEVICE, mode, str(batch)],
                              stdout=subprocess.PIPE, env={**os.environ, "RANK": str(rank), "WORLD_SIZE": str(k)})
             for rank in range(k)]
    results = [json.loads(p.communicate()[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert [r["shard"] for r in results] == [[rank, k] for rank in range(k)]
    steps = -(-(-(-n // k)) // batch)
    assert {r["len"] for r in results} == {steps}
    pad = -(-n // k) * k - n
    for epoch in range(2):
        assert all(len(r["epochs"][epoch]) == steps for r in results)  # equal steps: no rank waits at an all-reduce
        for rank, r in enumerate(results):  # exactly the documented plan
            assert r["epochs"][epoch] == plan_labels(db, epoch, batch_size=batch, num_shards=k,
                                                     shard_id=rank, seed=5, shuffle=mode == "train",
                                                     mark_padding=mode == "eval")
        seen = [label for r in results for b in r["epochs"][epoch] for label in b]
        real = [label for label in seen if label >= 0]
        if mode == "train":
            assert set(seen) == set(labels) and len(seen) == n + pad
        else:
            assert sorted(real) == sorted(labels) and seen.count(-1) == pad
    if mode == "train":
        assert results[0]["epochs"][0] != results[0]["epochs"][1]  # reshuffled every epoch


@pytest.mark.parametrize("name", ["encoded", "raw_leveldb"])
def test_a_new_loop_after_a_break_finishes_the_epoch_then_whole_epochs_follow(dbs, name):
    db, batch = dbs[name], 8
    expected = [plan_labels(db, epoch, batch_size=batch, seed=2) for epoch in range(5)]
    with Loader(db, batch_size=batch, train=True, device=DEVICE, num_threads=1, seed=2) as loader:
        assert len(loader) == len(expected[0])
        first = []
        for _, labels in loader:
            first.append(labels.tolist())
            if len(first) == 3:
                break
        assert (loader.epoch, loader.step) == (0, 3)
        rest = [labels.tolist() for _, labels in loader]  # the rest of epoch 0, nothing lost or repeated
        assert first + rest == expected[0]
        assert [[labels.tolist() for _, labels in loader] for _ in range(2)] == expected[1:3]
        # set_epoch moves to the start of another epoch, dropping what DALI prepared ahead; an
        # iterator left open stops
        stale = iter(loader)
        assert next(stale)[1].tolist() == expected[3][0] and (loader.epoch, loader.step) == (3, 1)
        loader.set_epoch(4)
        assert next(stale, None) is None
        assert [labels.tolist() for _, labels in loader] == expected[4]
        loader.set_epoch(3)  # another epoch: from its start
        assert [labels.tolist() for _, labels in loader] == expected[3]


RESTART_SCRIPT = """
import hashlib, json, os, sys, time
from imgprep.loading.loader import Loader
db, device, state_file, pace = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
with Loader(db, batch_size=8, train=True, device=device, num_threads=1, seed=9) as loader:
    if os.path.exists(state_file):
        loader.load_state_dict(json.load(open(state_file)))
    while loader.epoch < 2:
        for images, labels in loader:
            state = loader.state_dict()
            with open(state_file + ".tmp", "w") as f:   # a trainer's checkpoint after each step
                json.dump(state, f)
            os.replace(state_file + ".tmp", state_file)
            digest = hashlib.sha256(images.tobytes()).hexdigest()
            print(json.dumps({"at": [state["epoch"], state["step"]], "labels": labels.tolist(), "images": digest}),
                  flush=True)
            time.sleep(pace)
"""


def test_a_loader_killed_mid_epoch_restarts_from_its_state_exactly(dbs, tmp_path):
    """kill -9 mid-epoch, a new process from the last saved state: the same records, labels, crops and
    mirrors, batch for batch, as an uninterrupted run."""
    def run(state_file, pace=0.0):
        return subprocess.Popen([sys.executable, "-c", RESTART_SCRIPT, str(dbs["raw"]), DEVICE, str(state_file),
                                 str(pace)], stdout=subprocess.PIPE)

    whole = [json.loads(line) for line in run(tmp_path / "whole.json").communicate()[0].splitlines()]
    steps = len(whole) // 2
    killed = run(tmp_path / "state.json", pace=0.3)
    seen = [json.loads(killed.stdout.readline()) for _ in range(steps + 2)]  # into the second epoch
    killed.kill()
    killed.wait()
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["epoch"] == 1 and 0 < state["step"] < steps  # killed mid-epoch
    resumed = [json.loads(line) for line in run(tmp_path / "state.json").communicate()[0].splitlines()]
    done = steps + state["step"]
    assert seen[:done] == whole[:done]
    assert resumed == whole[done:]


def test_state_of_another_order_is_refused(dbs):
    with Loader(dbs["encoded"], batch_size=8, device=DEVICE, num_threads=1) as loader:
        state = loader.state_dict()
        with pytest.raises(ImgprepError, match="batch_size 16"):
            loader.load_state_dict({**state, "batch_size": 16})
        with pytest.raises(ImgprepError, match="not in this loader's epochs"):
            loader.load_state_dict({**state, "step": 10_000})
        with pytest.raises(ImgprepError, match="not in this loader's epochs"):
            loader.load_state_dict({**state, "epoch": True})
    with Loader(dbs["encoded"], batch_size=8, device=DEVICE, num_threads=1, policy="inception") as other:
        with pytest.raises(ImgprepError, match="policy"):  # its draws differ: not the run that saved it
            other.load_state_dict(state)


def test_corrupt_records_are_named_by_key(dbs, tmp_path):
    from imgprep.formats.codec import encode_datum
    from imgprep.formats.storage import open_writer
    from conftest import assert_clean_error, run_cli

    good = db_values(dbs["encoded"])[:20]
    for name, bad in (("badjpeg", encode_datum(b"\xff\xd8\xff\xe0 not a JPEG after all" * 20, 3, 3, 256, 256, True)),
                      ("notdatum", b"\x0f not a datum")):
        writer = open_writer(tmp_path / name, "lmdb")
        writer.put_batch(good[:10] + [(b"00000010_broken.JPEG", bad)] + [(b"%08d" % (i + 11) + k[8:], v)
                                                                         for i, (k, v) in enumerate(good[10:])])
        writer.close()
        with pytest.raises(ImgprepError, match="00000010_broken.JPEG"):
            with Loader(tmp_path / name, batch_size=4, train=False, device=DEVICE, num_threads=1) as loader:
                list(loader)
        result = run_cli("bench-loader", tmp_path / name, "--batch", "4", "--seconds", "0.2", "--threads", "1",
                         "--device", DEVICE, check=False)
        assert_clean_error(result, "00000010_broken.JPEG")


def db_values(db):
    with Reader(db) as reader:
        return list(reader.items())


def test_partial_builds_are_refused_unless_allowed_and_counts_come_from_the_manifest(dbs, tmp_path):
    import shutil

    from imgprep.formats.database import database_info

    db = tmp_path / "db"
    shutil.copytree(dbs["encoded_leveldb"], db)
    manifest = json.loads((db / "imgprep-build.json").read_text())
    # the count is the manifest's: the LevelDB is not walked for it (a wrong count shows it was read)
    (db / "imgprep-build.json").write_text(json.dumps({**manifest, "records": 7}))
    assert database_info(db).records == 7
    (db / "imgprep-build.json").write_text(json.dumps({**manifest, "state": "building"}))
    with pytest.raises(ImgprepError, match="incomplete build.*--resume.*allow_partial=True"):
        Loader(db, device=DEVICE)
    with Loader(db, batch_size=16, train=False, device=DEVICE, allow_partial=True) as loader:
        assert sorted(epoch_labels(loader)) == list(range(dbs["count"]))


def test_opening_a_loader_reads_the_manifest_once_and_options_are_keywords(dbs, monkeypatch):
    import imgprep.formats.database as database
    from imgprep.formats.manifest import read_manifest

    reads = []
    monkeypatch.setattr(database, "read_manifest", lambda path: reads.append(path) or read_manifest(path))
    with Loader(dbs["encoded"], batch_size=16, device=DEVICE) as loader:
        assert len(loader) == -(-dbs["count"] // 16)
    assert len(reads) == 1
    with pytest.raises(TypeError, match="positional"):
        Loader(dbs["encoded"], 16)


def test_encoded_records_without_sizes_as_caffe_may_write_them(dbs, tmp_path):
    """Only data, label and encoded: the loader takes nothing from a record's channels/height/width."""
    from imgprep.formats.codec import LENGTH, VARINT, _key, _varint
    from imgprep.formats.storage import open_writer

    records = []
    for key, value in db_values(dbs["encoded"])[:12]:
        datum = decode_datum(value)
        records.append((key, b"".join((_key(4, LENGTH), _varint(len(datum.data)), datum.data,
                                       _key(5, VARINT), _varint(datum.label), _key(7, VARINT), b"\x01"))))
    writer = open_writer(tmp_path / "caffe", "lmdb")
    writer.put_batch(records)
    writer.close()
    with Loader(tmp_path / "caffe", batch_size=5, train=False, device=DEVICE, normalize="none", layout="NHWC") as bare, \
            Loader(dbs["encoded"], batch_size=200, train=False, device=DEVICE, normalize="none", layout="NHWC") as full:
        reference = {int(l): im for images, labels in full for im, l in zip(images, labels)}
        got = [(int(l), im) for images, labels in bare for im, l in zip(images, labels)]
    assert bare.info.stored_size is None and len(got) == 12
    assert_same_decoded([image for _, image in got], [reference[label] for label, _ in got])  # other batches


def test_bad_arguments_are_clear_errors_naming_the_argument(dbs, monkeypatch):
    from imgprep.loading.options import OptionError

    db = dbs["raw"]
    for kwargs, message in (({"num_shards": 0, "shard_id": 0}, "num_shards must be a whole number >= 1, not 0"),
                            ({"num_shards": -2, "shard_id": 0}, "num_shards must be a whole number >= 1, not -2"),
                            ({"num_shards": 2, "shard_id": 2}, r"shard_id 2 is not in 0..1"),
                            ({"num_shards": 2}, "pass shard_id and num_shards together"),
                            ({"batch_size": 0}, "batch_size must be a whole number >= 1, not 0"),
                            ({"crop": 0}, "crop must be a whole number >= 1, not 0"),
                            ({"resize_shorter": 0, "policy": "center", "train": False}, "resize_shorter must be"),
                            ({"seed": 1.5}, "seed must be a whole number")):
        with pytest.raises(OptionError, match=message) as caught:
            Loader(db, device=DEVICE, num_threads=1, **kwargs)
        assert isinstance(caught.value, ValueError) and isinstance(caught.value, ImgprepError)
    for environment, message in (({"WORLD_SIZE": "0"}, "WORLD_SIZE='0' in the environment"),
                                 ({"RANK": "abc", "WORLD_SIZE": "2"}, "RANK='abc' in the environment"),
                                 ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 in the environment is not below "
                                                                    "WORLD_SIZE=2")):
        with monkeypatch.context() as patched:
            for name, value in environment.items():
                patched.setenv(name, value)
            with pytest.raises(OptionError, match=message):
                Loader(db, device=DEVICE, num_threads=1)
            with Loader(db, device=DEVICE, num_threads=1, shard_id=0, num_shards=1) as loader:  # explicit: env unread
                assert (loader.shard_id, loader.num_shards) == (0, 1)
    with Loader(db, batch_size=8, device=DEVICE, num_threads=1) as loader:
        state = loader.state_dict()
        for key in ("step", "epoch"):
            with pytest.raises(ImgprepError, match=f"the saved loader state has no {key}"):
                loader.load_state_dict({k: v for k, v in state.items() if k != key})


def test_a_crop_larger_than_the_images_is_a_clear_error(dbs, tmp_path):
    """Checked before DALI runs where the size is known (the resized shorter side, or a stored-size mean's
    records); otherwise DALI's own reason (the window out of bounds) is kept, never only 'Current pipeline
    object is no longer valid'."""
    from imgprep.formats.codec import encode_datum
    from imgprep.loading.options import OptionError
    from imgprep.formats.storage import open_writer

    with pytest.raises(OptionError, match="crop 300 is larger than resize_shorter 256"):
        Loader(dbs["raw"], crop=300, device=DEVICE)
    with pytest.raises(OptionError, match=r"crop 300 is larger than resize_shorter 256: the 'ten-crop' policy"):
        Loader(dbs["encoded"], crop=300, train=False, policy="ten-crop", device=DEVICE)
    mean = write_mean(tmp_path / "m.binaryproto", np.zeros((3, 256, 256)))
    with pytest.raises(OptionError, match=r"crop 300 is larger than the records \(256x256\)"):
        Loader(dbs["raw"], crop=300, resize_shorter=320, normalize=mean, device=DEVICE)
    # a foreign raw database whose records differ in size: taken to hold the first one's size, 256x256
    records = [(b"%08d" % i, encode_datum(np.zeros((3, side, side), np.uint8).tobytes(), i, 3, side, side, False))
               for i, side in enumerate((256, 256, 256, 100))]
    writer = open_writer(tmp_path / "mixed", "lmdb")
    writer.put_batch(records)
    writer.close()
    with pytest.raises(ImgprepError) as caught:
        with Loader(tmp_path / "mixed", batch_size=4, train=False, device=DEVICE, num_threads=1) as loader:
            list(loader)
    message = str(caught.value)
    assert "crop_mirror_normalize stopped: Slice can't be placed out of bounds" in message, message
    assert "100 x 100" in message and "no longer valid" not in message


def test_the_gpu_is_the_requested_or_the_current_device_and_must_exist():
    """device_id: explicit, else the current CUDA device (torch.cuda.set_device), else under torchrun
    LOCAL_RANK where every rank sees every GPU; an id that is not a visible GPU is a clear error."""
    from imgprep.loading.loader import choose_device_id

    assert choose_device_id(None, {}, 1, 0) == 0
    assert choose_device_id(None, {}, 4, 2) == 2  # torch.cuda.set_device(2), no LOCAL_RANK
    assert choose_device_id(None, {}, 4, None) == 0
    assert choose_device_id(3, {"LOCAL_RANK": "1"}, 4, 2) == 3
    assert choose_device_id(np.int64(1), {}, 2, 0) == 1
    assert choose_device_id(None, {"LOCAL_RANK": "3"}, 4, 0) == 3  # torchrun, every GPU visible, no set_device
    assert choose_device_id(None, {"LOCAL_RANK": "3"}, 4, 1) == 1  # set_device wins over LOCAL_RANK
    assert choose_device_id(None, {"LOCAL_RANK": "3", "CUDA_VISIBLE_DEVICES": "3"}, 1, 0) == 0  # one GPU per rank
    for requested, visible, current, env, message in (
            (1, 1, 0, {"CUDA_VISIBLE_DEVICES": "5"}, r"device_id 1 is not a GPU of this process: 1 GPU\(s\) "
                                                    r"visible \(CUDA_VISIBLE_DEVICES='5'\), id 0"),
            (-1, 2, 0, {}, r"device_id -1 is not a GPU of this process: 2 GPU\(s\) visible, ids 0..1"),
            (True, 2, 0, {}, "device_id True"),
            (None, 2, 5, {}, "the current CUDA device 5 is not a GPU of this process"),
            (None, 0, None, {}, "needs a GPU and there is none"),
            (None, 2, 0, {"LOCAL_RANK": "x"}, "LOCAL_RANK='x' is not a GPU index")):
        with pytest.raises(ImgprepError, match=message):
            choose_device_id(requested, env, visible, current)
