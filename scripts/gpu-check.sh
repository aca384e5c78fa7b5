#!/usr/bin/env bash
# Everything imgprep wants measured on a GPU machine with many cores, in one run: the loader's contract and
# policy tests through the GPU graph, bench-loader (every policy, peers, cpu_share splits), the loader's
# feed per policy, the ResNet-50 example, and build-lmdb at 1-16 jobs and in shards. Needs imgprep's dependencies;
# DALI_SITE=DIR puts a DALI unpacked in DIR on the path. PER_CLASS (default 500) sizes the 20-class sample.
# Writes doctor.txt, loader-tests.txt, bench.md, bench-policies.md, bench-split.md, feed.md,
# train-resnet50.txt and bench-cores.md to $OUT (or build/gpu-check).
set -uo pipefail
site=${DALI_SITE:-/tmp/dali/site}
out=${OUT:-build/gpu-check}
work=${WORK:-/tmp/imgprep-gpu}
export PYTHONPATH=$site:$PWD PYTHONUNBUFFERED=1
mkdir -p "$out" "$work"
py=${PYTHON:-python3}
$py -m imgprep doctor 2>&1 | tee "$out/doctor.txt"
# the loader's assertions through the GPU graph ('mixed' decode, GPU crop/normalise, torch on CUDA), the
# order contract included: uneven shards across processes (train and eval), break then whole epochs,
# kill -9 mid-epoch and restart from state_dict (same records, labels and crops as an uninterrupted run);
# every policy's images against its numpy reference
IMGPREP_TEST_DEVICE=gpu $py -m pytest -q -p no:cacheprovider tests/test_loader.py tests/test_order.py \
    tests/test_policies.py 2>&1 \
    | tee "$out/loader-tests.txt"
# ImageNet-sized data (10k images, ~100 s to make): originals, then the ResNet-preset LMDB
if [ ! -d "$work/sample/train" ]; then
    $py -m imgprep sample "$work/sample" --classes 20 --train-per-class "${PER_CLASS:-500}" --val-per-class 1 --grain 8
    $py -m imgprep make-lists "$work/sample" --out "$work/lists"
    $py -m imgprep build-lmdb "$work/lists/train.txt" "$work/sample/train" "$work/train_lmdb" --preset resnet --shuffle
fi
if [ ! -d "$work/train480_lmdb" ]; then  # records for the resnet policy's scale augmentation up to 480
    $py -m imgprep build-lmdb "$work/lists/train.txt" "$work/sample/train" "$work/train480_lmdb" --preset resnet480 --shuffle
fi
$py -m imgprep bench-loader "$work/train_lmdb" --batch 256 --threads 8 --seconds 10 \
    --compare "$work/sample/train" --torch-workers 16 2>&1 | tee "$out/bench.md"
# every policy side by side on the 256 records, and the resnet policy on the 480 records it is meant for
$py -m imgprep bench-loader "$work/train_lmdb" --batch 256 --threads 8 --seconds 5 --policy all \
    --torch-workers 16 2>&1 | tee "$out/bench-policies.md"
$py -m imgprep bench-loader "$work/train480_lmdb" --batch 256 --threads 8 --seconds 5 --policy caffe,resnet \
    --torch-workers 16 2>&1 | tee -a "$out/bench-policies.md"
for split in "6 0.3 10" "6 0.35 10" "8 0.4 8"; do
    set -- $split
    $py -m imgprep bench-loader "$work/train_lmdb" --batch 256 --threads "$1" --seconds 10 \
        --cpu-share "$2" --cpu-threads "$3" 2>&1 | tee -a "$out/bench-split.md"
done
# the feed alone, per policy (CPU per record on the feeding thread), which must stay well above the GPU's decode rate
$py benchmarks/bench_feed.py --images 2000 --workdir "$work/bench" 2>&1 | tee "$out/feed.md"
# the example trainer on the GPU: ResNet-50, fp16 batches from the loader, throughput per 20 steps
$py examples/train_resnet50.py "$work/train_lmdb" --steps 100 --batch 128 2>&1 | tee "$out/train-resnet50.txt"
$py examples/train_resnet50.py "$work/train480_lmdb" --policy resnet --steps 40 --batch 128 --val "$work/train_lmdb" \
    --eval center --eval ten-crop 2>&1 | tee -a "$out/train-resnet50.txt"
# build-lmdb beyond 2 cores: img/s and the single writer's share of its core at 1-16 jobs, then
# shards built at once + merge (the way past one writer), on the same 10k ImageNet-sized JPEGs
$py benchmarks/bench_cores.py --list "$work/lists/train.txt" --root "$work/sample/train" --workdir "$work/cores" \
    --jobs 1,2,4,8,16 --shards 2,4,8 --preset caffe 2>&1 | tee "$out/bench-cores.md"
