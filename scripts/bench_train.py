"""ResNet-50 training throughput on one GPU (AMP, channels_last, SGD: examples/train_resnet50.py's
step), fed three ways with the same images and policy (shorter side 256, random 224 crop, mirror):
synthetic batches already on the GPU (the model's own ceiling), imgprep's loader on the LMDB, and
a PyTorch DataLoader whose workers decode the original JPEGs with Pillow (torchvision's transforms
where torchvision imports). Then evaluation throughput with the center and ten-crop policies
(`evaluate` of the example: ten-crop averages an image's ten views).

    python scripts/bench_train.py DB --originals ROOT --list LIST [--val VAL_DB] [--batch 256]
        [--workers 16] [--threads 8] [--warmup 10] [--steps 40]

Prints one JSON object: a row per feed (img/s, ms per step) and per evaluation mode (img/s).
Without a GPU it runs on the CPU in fp32 (slowly).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from train_resnet50 import evaluate  # noqa: E402

from imgprep.loading.peers import ImageFiles, PillowTransform, image_files, torchvision_transform  # noqa: E402
from imgprep.loading.loader import Loader
from imgprep.loading.policies import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB  # noqa: E402


def timed_steps(model, optimizer, scaler, batches, device, warmup: int, steps: int) -> tuple[float, float]:
    """(img/s, ms per step) of `steps` training steps after `warmup` ones, batches from `batches`."""
    def step(images, labels):
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(images.contiguous(memory_format=torch.channels_last)), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    seen, start = 0, None
    for i, (images, labels) in enumerate(batches):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        step(images.to(device, non_blocking=True), labels.to(device, non_blocking=True))
        seen += labels.shape[0] if i >= warmup else 0
        if i + 1 == warmup + steps:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return seen / seconds, 1000 * seconds / steps


def forever(loader):
    while True:
        yield from loader


def synthetic(batch: int, device, dtype):
    images = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
    labels = torch.randint(0, 1000, (batch,), device=device)
    while True:
        yield images, labels


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db")
    parser.add_argument("--originals", type=Path, required=True, help="the JPEGs the LMDB was built from")
    parser.add_argument("--list", type=Path, required=True, help="their 'path label' list")
    parser.add_argument("--val", help="an evaluation LMDB: center and ten-crop throughput")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=16, help="DataLoader worker processes")
    parser.add_argument("--threads", type=int, default=8, help="the loader's DALI threads")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()

    import torchvision

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dtype = torch.float16 if cuda else torch.float32
    torch.backends.cudnn.benchmark = True
    model = torchvision.models.resnet50(num_classes=1000).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(enabled=cuda)
    rows = []

    def run(name, batches, note=""):
        rate, ms = timed_steps(model, optimizer, scaler, batches, device, args.warmup, args.steps)
        rows.append({"feed": name, "images_per_s": round(rate, 1), "ms_per_step": round(ms, 2), "note": note})
        print(f"{name}: {rate:,.0f} img/s", file=sys.stderr, flush=True)

    run("synthetic batches on the device (the model's ceiling)", synthetic(args.batch, device, dtype))
    with Loader(args.db, batch_size=args.batch, train=True, dtype="float16" if cuda else "float32",
                num_threads=args.threads, output="torch", layout="NCHW", policy="caffe") as loader:
        run("imgprep loader (caffe policy)", forever(loader), f"{loader.device}, {args.threads} DALI threads")
    transform = torchvision_transform(True, False, IMAGENET_MEAN_RGB, IMAGENET_STD_RGB)
    kind = "torchvision transforms" if transform else "Pillow, no torchvision transforms"
    dataset = ImageFiles(image_files(args.originals, args.list),
                         transform or PillowTransform(True, False, IMAGENET_MEAN_RGB, IMAGENET_STD_RGB))
    data_loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                                              pin_memory=cuda, persistent_workers=args.workers > 0, drop_last=True)
    run(f"PyTorch DataLoader, {args.workers} workers, original JPEGs", forever(data_loader),
        f"{kind}; Resize 256 + RandomCrop 224 + flip")
    del data_loader
    for mode in (["center", "ten-crop"] if args.val else []):
        batch = args.batch if mode == "center" else max(1, args.batch // 10)
        with Loader(args.val, batch_size=batch, train=False, policy=mode, num_threads=args.threads, output="torch",
                    dtype="float16" if cuda else "float32") as val:
            evaluate(model, val, device)  # warm-up: pipeline, cuDNN's choice of kernels for these shapes
            start = time.perf_counter()
            evaluate(model, val, device)
            seconds = time.perf_counter() - start
            views = ", 10 views each" if mode == "ten-crop" else ""
            rows.append({"feed": f"evaluation, {mode} policy", "images_per_s": round(val.epoch_size / seconds, 1),
                         "ms_per_step": round(1000 * seconds / len(val), 2),
                         "note": f"{val.epoch_size} images, batch {batch}{views}"})
    print(json.dumps({"device": str(device), "gpu": torch.cuda.get_device_name(0) if cuda else None,
                      "batch": args.batch, "warmup": args.warmup, "steps": args.steps, "rows": rows}))


if __name__ == "__main__":
    main()
