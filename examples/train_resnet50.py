"""Train ResNet-50 from an imgprep LMDB with the DALI loader (GPU), printing throughput.

    torchrun --nproc_per_node=8 examples/train_resnet50.py /data/train_lmdb --epochs 90
    torchrun --nproc_per_node=8 examples/train_resnet50.py /data/train480_lmdb --policy resnet \
        --val /data/val_lmdb --eval center --eval ten-crop --epochs 120
    python examples/train_resnet50.py build/demo/train_lmdb --steps 50 --batch 64   # a smoke run

--policy picks the loader's training policy (caffe: shorter 256 + random 224 crop + mirror; resnet:
the paper's scale augmentation [256, 480] + crop + mirror + PCA lighting, best on records built with
--preset resnet480; inception: RandomResizedCrop + mirror). With --val, each --eval mode (center,
ten-crop) reports top-1/top-5 on the validation database after every epoch: ten-crop averages the
softmax of an image's ten views (`evaluate`).

Each process reads its own shard (RANK / WORLD_SIZE from torchrun) of the epoch's seeded order; every
rank runs the same number of steps and every record is seen in each epoch. With --checkpoint the
model, optimizer and the loader's position are saved every --save-every steps, and a run started
again with the same --checkpoint continues from the saved batch (the same records, crops and mirrors
as an uninterrupted run). Without a GPU it runs on the CPU (slowly) through DALI's CPU mode.
Needs torch and torchvision.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from imgprep.loading.loader import Loader


def evaluate(model, loader, device) -> tuple[float, float]:
    """(top-1, top-5) accuracy of `model` over `loader`'s evaluation epoch, all ranks together.
    Ten-crop batches are (B, 10, C, H, W): the model sees the B*10 views, and an image's prediction
    is the mean of its views' softmax. Padding samples (label -1) are skipped."""
    model.eval()
    hits = torch.zeros(3, dtype=torch.float64, device=device)  # top-1, top-5, images
    with torch.no_grad(), torch.autocast(device.type, enabled=device.type == "cuda"):
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            if images.dim() == 5:  # views per image
                batch, views = images.shape[:2]
                probabilities = model(images.flatten(0, 1)).float().softmax(-1).view(batch, views, -1).mean(1)
            else:
                probabilities = model(images).float().softmax(-1)
            real = labels >= 0
            top5 = probabilities.topk(min(5, probabilities.shape[-1]), dim=-1).indices[real]
            hits[0] += (top5[:, 0] == labels[real]).sum()
            hits[1] += (top5 == labels[real, None]).any(-1).sum()
            hits[2] += real.sum()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(hits)
    model.train()
    return (hits[0] / hits[2]).item(), (hits[1] / hits[2]).item()


def train_loop(loader, epochs: int, steps: int, train_step, end_of_epoch, step: int = 0) -> int:
    """Runs `train_step(images, labels, step, img/s so far this epoch, epoch)` on every batch: whole
    epochs from the loader's up to `epochs`, or, with `steps` > 0, as many epochs as it takes to reach
    `steps` steps in all (the last one cut short), whatever `epochs` says. `end_of_epoch(epoch,
    images, seconds)` follows each epoch, the cut one too. `step` counts the steps a resumed run has
    already made (the loader continues inside its epoch). Returns the steps made in all."""
    epoch = loader.epoch
    while step < steps if steps else epoch < epochs:
        loader.set_epoch(epoch)  # keeps a resumed position inside this epoch
        seen, start = 0, time.perf_counter()
        for images, labels in loader:
            step += 1
            seen += labels.shape[0]
            train_step(images, labels, step, seen / (time.perf_counter() - start), epoch)
            if steps and step >= steps:
                break
        end_of_epoch(epoch, seen, time.perf_counter() - start)
        epoch += 1
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("db")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=0,
                        help="stop after this many steps, running as many epochs as they take (0: --epochs epochs)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--checkpoint", help="file to save to every --save-every steps, and to resume from")
    parser.add_argument("--save-every", type=int, default=1000)
    parser.add_argument("--policy", default="caffe", choices=["caffe", "resnet", "inception"],
                        help="the loader's training policy (default: caffe)")
    parser.add_argument("--val", help="validation database: evaluated after every epoch with each --eval mode")
    parser.add_argument("--eval", dest="eval_modes", action="append", choices=["center", "ten-crop"],
                        help="evaluation policy for --val, repeatable (default: center)")
    args = parser.parse_args()

    import torchvision

    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if distributed:
        torch.distributed.init_process_group("nccl")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    loader = Loader(args.db, batch_size=args.batch, train=True, dtype="float16" if device.type == "cuda" else "float32",
                    num_threads=args.threads, output="torch", layout="NCHW", policy=args.policy)
    evaluations = {mode: Loader(args.val, batch_size=args.batch if mode == "center" else max(1, args.batch // 10),
                                train=False, policy=mode, num_threads=args.threads, output="torch",
                                dtype="float16" if device.type == "cuda" else "float32")
                   for mode in (args.eval_modes or ["center"])} if args.val else {}
    model = torchvision.models.resnet50(num_classes=1000).to(device, memory_format=torch.channels_last)
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index])
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(enabled=device.type == "cuda")
    step = 0
    rank = int(os.environ.get("RANK", 0))
    if args.checkpoint and os.path.exists(args.checkpoint):
        saved = torch.load(args.checkpoint, map_location=device)
        (model.module if distributed else model).load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        loader.load_state_dict(saved["loader"])  # the same position on every rank
        step = saved["step"]
        print(f"resumed at epoch {loader.epoch} step {loader.step}", flush=True)

    def train_step(images, labels, step, rate, epoch):
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(images.contiguous(memory_format=torch.channels_last)), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if step % 20 == 0:
            print(f"epoch {epoch} step {step} loss {loss.item():.3f} {rate:,.0f} img/s per process", flush=True)
        if args.checkpoint and step % args.save_every == 0 and rank == 0:
            torch.save({"model": (model.module if distributed else model).state_dict(),
                        "optimizer": optimizer.state_dict(), "loader": loader.state_dict(), "step": step},
                       args.checkpoint)

    def end_of_epoch(epoch, seen, seconds):
        print(f"epoch {epoch}: {seen} images in {seconds:.1f}s")
        for mode, val_loader in evaluations.items():
            top1, top5 = evaluate(model, val_loader, device)
            if rank == 0:
                print(f"epoch {epoch} eval {mode}: top-1 {top1:.2%} top-5 {top5:.2%}", flush=True)

    train_loop(loader, args.epochs, args.steps, train_step, end_of_epoch, step)


if __name__ == "__main__":
    main()
