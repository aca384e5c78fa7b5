"""Train ResNet-50 from an imgprep LMDB with the DALI loader (GPU), printing throughput.

    torchrun --nproc_per_node=8 examples/train_resnet50.py /data/train_lmdb --epochs 90
    python examples/train_resnet50.py build/demo/train_lmdb --steps 50 --batch 64   # a smoke run

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

from imgprep.loader import Loader


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("db")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: whole epochs)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--checkpoint", help="file to save to every --save-every steps, and to resume from")
    parser.add_argument("--save-every", type=int, default=1000)
    args = parser.parse_args()

    import torchvision

    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if distributed:
        torch.distributed.init_process_group("nccl")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    loader = Loader(args.db, batch_size=args.batch, train=True, dtype="float16" if device.type == "cuda" else "float32",
                    num_threads=args.threads, output="torch", layout="NCHW")
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
    for epoch in range(loader.epoch, args.epochs):
        loader.set_epoch(epoch)  # keeps a resumed position inside this epoch
        seen, start = 0, time.perf_counter()
        for images, labels in loader:
            with torch.autocast(device.type, enabled=device.type == "cuda"):
                loss = F.cross_entropy(model(images.contiguous(memory_format=torch.channels_last)), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            seen += labels.shape[0]
            step += 1
            if step % 20 == 0:
                rate = seen / (time.perf_counter() - start)
                print(f"epoch {epoch} step {step} loss {loss.item():.3f} {rate:,.0f} img/s per process", flush=True)
            if args.checkpoint and step % args.save_every == 0 and rank == 0:
                torch.save({"model": (model.module if distributed else model).state_dict(),
                            "optimizer": optimizer.state_dict(), "loader": loader.state_dict(), "step": step},
                           args.checkpoint)
            if args.steps and step >= args.steps:
                return
        print(f"epoch {epoch}: {seen} images in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
