"""What imgprep wants measured on a GPU machine, in tiers that each fit a budget of device time
(run through scripts/gpu-check.sh; scripts/GPU-CHECK.md gives the whole sequence of calls).

    gpu-check.sh --tier N [--budget SECONDS]     one tier (repeat --tier for several)
    gpu-check.sh --dry-run                       every tier's steps and command lines, on a CPU, tiny

Tier 1, correctness: doctor, the loader's GPU graph once per policy, the order-contract and policy
tests through the GPU graph, a break and a kill -9 + restart through it. Tier 2, the headline:
bench-loader against the peers on ImageNet-sized data, one row per policy, the record source alone,
the feed's CPU time per record, a cpu_share split. Tier 3, at scale: ResNet-50 training fed by the
loader, by a DataLoader and by synthetic batches, center and ten-crop evaluation, the example
trainer, build-lmdb at 1-16 jobs and in shards + merge.

A step whose estimate does not fit what is left of the budget is skipped ("skipped: would not fit"),
and one still running when the budget runs out is stopped, so a tier ends within its budget. After
every step OUT holds summary.json (every step so far on this machine: status, seconds, figures,
command lines), report.md (the tables) and log.txt (this run's output), so a command cut short
still returns what finished. The data (WORK/data) is made once per machine and reused by later tiers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TIER_BUDGETS = {1: 150, 2: 215, 3: 180}  # seconds; scripts/gpu-check.sh's header adds them up
# The rest of the device time the plan of scripts/GPU-CHECK.md takes, in seconds: the machine's start, the
# call carrying DALI's first part, unpacking, and the transfers back and gaps between the four calls.
PLAN_OVERHEAD = {"start": 120, "first part": 20, "unpack": 15, "transfers and gaps": 65}
PLAN_LIMIT = 13 * 60
OUT_FILES = ("summary.json", "report.md", "log.txt")
WORK_MARKER = "imgprep-gpu-check.txt"
GRAIN = 8  # imgprep sample --grain 8: ImageNet's file size and decoding cost (benchmarks/common.py's)


@dataclass(frozen=True)
class Sizes:
    """Every size a step's command line takes; the dry run uses the same lines with tiny values."""

    images: int  # ImageNet-sized JPEGs: `unique` made by imgprep sample, linked under more names up to `images`
    unique: int
    classes: int
    val: int  # records of the evaluation LMDB (a spread of the train entries)
    batch: int
    threads: int  # DALI threads
    workers: int  # DataLoader worker processes
    seconds: float  # per bench-loader row, headline
    policy_seconds: float  # per bench-loader row, policies and the split
    feed_records: int
    source_runs: int
    feed_seconds: float
    train_batch: int
    train_warmup: int
    train_steps: int
    example_steps: int
    example_batch: int
    jobs: str
    shards: str
    device: str
    smoke_per_class: int = 16
    smoke_seconds: float = 0.3
    pytest_select: dict = field(default_factory=dict)  # step -> extra pytest arguments


REAL = Sizes(images=10_000, unique=1_000, classes=20, val=2_000, batch=256, threads=8, workers=16, seconds=4,
             policy_seconds=2.5, feed_records=20000, source_runs=3, feed_seconds=5, train_batch=256, train_warmup=10,
             train_steps=40, example_steps=100, example_batch=128, jobs="1,2,4,8,16", shards="2,4,8", device="gpu")
# The dry run: the tests run in DALI's CPU mode in CI already, so a few of them show the lines work.
DRY = Sizes(images=32, unique=16, classes=4, val=8, batch=8, threads=2, workers=0, seconds=0.1, policy_seconds=0.05,
            feed_records=64, source_runs=1, feed_seconds=0.1, train_batch=4, train_warmup=1, train_steps=2,
            example_steps=10, example_batch=4, jobs="1,2", shards="2", device="cpu", smoke_per_class=4,
            smoke_seconds=0.05,
            pytest_select={"contract-tests": ["-k", "splitmix64 or documented_lanes or permutation_is_pinned"],
                           "break-restart": ["-k", "after_a_break and encoded"]})


class StepFailed(Exception):
    """A step's own failure, in one line."""


@dataclass
class Step:
    tier: int
    name: str
    estimate: float  # seconds on the GPU machine at REAL sizes, start-up included
    dry_estimate: float  # seconds in the dry run on a 2-core machine
    run: object  # run(ctx) -> (figures dict, report markdown)
    what: str
    gate: str | None = None  # a failure matching this regex means the tier's later steps cannot work: skipped


STEPS: list[Step] = []


def step(tier: int, name: str, estimate: float, dry_estimate: float, gate: str | None = None):
    """Registers a step of `tier`, in the order of importance the tier runs them in."""
    def register(run):
        what = " ".join((run.__doc__ or "").strip().split("\n\n")[0].split())  # its docstring's first paragraph
        STEPS.append(Step(tier, name, estimate, dry_estimate, run, what, gate))
        return run
    return register


class Context:
    """What a step needs: sizes, folders, the environment and a way to run commands within the budget."""

    def __init__(self, sizes: Sizes, dry: bool, work: Path, out: Path, site: Path | None, log):
        self.sizes, self.dry, self.work, self.out, self.site, self.log = sizes, dry, work, out, site, log
        self.python = sys.executable
        self.deadline = float("inf")
        self.commands: list[str] = []
        self.last_error = ""
        self.data = work / "data"
        self.sample = self.data / f"sample{sizes.images}-grain{GRAIN}"  # benchmarks/common.py's names
        self.lists = self.data / f"lists{sizes.images}-grain{GRAIN}"
        self.train_db, self.val_db, self.train480_db = (self.data / n for n in ("train_lmdb", "val_lmdb",
                                                                               "train480_lmdb"))

    def env(self, extra: dict | None = None, rehearsal: bool = False) -> dict:
        path = [str(self.site)] if self.site else []
        if rehearsal and self.dry:
            path.insert(0, str(ROOT / "scripts" / "rehearsal"))  # the stand-in torchvision
        given = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path + [str(ROOT)] + given), PYTHONUNBUFFERED="1",
                   XLA_PYTHON_CLIENT_PREALLOCATE="false",  # JAX would take 75% of the GPU's memory
                   XDG_CACHE_HOME=str(self.work / "cache"))
        env.pop("IMGPREP_TEST_DEVICE", None)
        env.update(extra or {})
        return env

    def imgprep(self, *args) -> list[str]:
        return [self.python, "-m", "imgprep", *map(str, args)]

    def script(self, path: str, *args) -> list[str]:
        return [self.python, str(ROOT / path), *map(str, args)]

    def run(self, argv: list[str], env_extra: dict | None = None, rehearsal: bool = False, check: bool = True):
        """Runs a command to the budget's end at most; (exit status, stdout). Its stdout and stderr go to
        the log as they come; a non-zero exit raises StepFailed with its last error line."""
        line = shlex.join(argv).replace(self.python, "python")
        self.commands.append(line)
        self.log.write(f"$ {line}\n")
        self.log.flush()
        proc = subprocess.Popen(argv, cwd=ROOT, env=self.env(env_extra, rehearsal), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True)
        stdout, stderr = [], []

        def pump(stream, keep):
            for text in stream:
                keep.append(text)
                self.log.write(text)
                self.log.flush()
        pumps = [threading.Thread(target=pump, args=(proc.stdout, stdout), daemon=True),
                 threading.Thread(target=pump, args=(proc.stderr, stderr), daemon=True)]
        for t in pumps:
            t.start()
        try:
            proc.wait(timeout=max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise StepFailed("stopped: the tier's budget ran out while it ran") from None
        finally:
            for t in pumps:
                t.join(timeout=5)
        lines = [t.strip() for t in stderr + stdout if t.strip() and not t.startswith(" ")]
        self.last_error = lines[-1] if proc.returncode and lines else ""
        if check and proc.returncode != 0:
            raise StepFailed(f"exit {proc.returncode}: {self.last_error[:400]}")
        return proc.returncode, "".join(stdout)


def last_json(stdout: str):
    for line in reversed(stdout.splitlines()):
        if line.startswith(("{", "[")):
            return json.loads(line)
    raise StepFailed("no JSON in the output")


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows])


def md_tables(text: str) -> list[list[dict]]:
    """The markdown tables printed in `text`, each as a list of {header: cell} rows."""
    tables, current, header = [], None, None
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if current is None:
                header, current = cells, []
            elif not all(set(c) <= set("-: ") for c in cells):
                current.append(dict(zip(header, cells)))
        elif current is not None:
            tables.append(current)
            current = None
    return tables


def number(cell: str):
    try:
        return float(cell.replace(",", "").rstrip("%x"))
    except ValueError:
        return cell


# DALI's GPU code does not run on this GPU (a pack pruned for another architecture, say): nothing after will
NO_GPU_CODE = r"no kernel image|NO_BINARY_FOR_GPU|invalid device function"


# ---- tier 1: correctness ---------------------------------------------------------------------------


@step(1, "doctor", 6, 3, gate="")
def doctor(ctx: Context):
    """imgprep doctor: the PIL build, DALI, devices, torch."""
    _, out = ctx.run(ctx.imgprep("doctor"))
    figures = dict(line.strip().split(": ", 1) for line in out.splitlines() if ": " in line)
    if not ctx.dry and "CUDA GPU" not in figures.get("devices", ""):
        # doctor says what DALI sees, not why: DALI's own error (a library missing from its pack, a driver)
        status, why = ctx.run([ctx.python, "-c", "from nvidia.dali.backend import GetCUDADeviceCount as n; print(n())"],
                              check=False)
        raise StepFailed(f"DALI sees no GPU: {figures.get('devices')}; DALI says: "
                         f"{(ctx.last_error or why.strip() or f'exit {status}')[:300]}", figures)
    return figures, "```\n" + out.strip() + "\n```"


@step(1, "gpu-graph-smoke", 15, 10, gate=NO_GPU_CODE)
def smoke(ctx: Context):
    """The loader's graph once per policy on a bundled-sample LMDB: every row must run."""
    where = ctx.work / "smoke"
    if not (where / "db" / "data.mdb").exists():
        shutil.rmtree(where, ignore_errors=True)
        ctx.run(ctx.imgprep("sample", where / "sample", "--classes", 2, "--train-per-class",
                            ctx.sizes.smoke_per_class, "--val-per-class", 1))
        ctx.run(ctx.imgprep("make-lists", where / "sample", "--out", where / "lists"))
        ctx.run(ctx.imgprep("build-lmdb", where / "lists" / "train.txt", where / "sample" / "train", where / "db",
                            "--preset", "resnet", "--shuffle", "--jobs", 1))
    rows = bench(ctx, where / "db", "--batch", 8, "--threads", 2, "--seconds", ctx.sizes.smoke_seconds,
                 "--policy", "all", "--torch-workers", 0)
    return {"rows": rows}, bench_table(rows)


def pytest_step(ctx: Context, name: str, files: list[str], select: list[str]):
    args = ["-m", "pytest", "-v", "-rs", "-p", "no:cacheprovider", "--basetemp", str(ctx.work / f"pytest-{name}"),
            *files, *ctx.sizes.pytest_select.get(name, select)]
    env = {} if ctx.dry else {"IMGPREP_TEST_DEVICE": "gpu"}
    status, out = ctx.run([ctx.python, *args], env, check=False)
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed)",
                                                     summary)}
    skipped = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    failed = [line.split()[0] for line in out.splitlines() if line.endswith("FAILED") or " FAILED " in line]
    figures = {"counts": counts, "summary": summary.strip("= "), "skipped": skipped, "failed": failed[:50],
               "device": "cpu" if ctx.dry else "gpu"}
    if status != 0 or not counts.get("passed"):
        raise StepFailed(f"pytest exit {status}: {summary.strip('= ')}", figures)
    report = f"{summary.strip('= ')} (IMGPREP_TEST_DEVICE={figures['device']})"
    return figures, report + ("\n\n" + "\n".join(f"- {s}" for s in skipped) if skipped else "")


BREAK_RESTART = "after_a_break or killed_mid_epoch"


@step(1, "contract-tests", 95, 20)
def contract_tests(ctx: Context):
    """tests/test_loader.py, test_order.py, test_policies.py through the GPU graph (IMGPREP_TEST_DEVICE=gpu)."""
    return pytest_step(ctx, "contract-tests", ["tests/test_loader.py", "tests/test_order.py", "tests/test_policies.py"],
                       ["-k", f"not ({BREAK_RESTART})"])


@step(1, "break-restart", 30, 18)
def break_restart(ctx: Context):
    """A break mid-epoch then whole epochs, and kill -9 mid-epoch + restart from state_dict, through the GPU graph."""
    return pytest_step(ctx, "break-restart", ["tests/test_loader.py"], ["-k", BREAK_RESTART])


# ---- tier 2: the headline ----------------------------------------------------------------------------


def data_ready(ctx: Context) -> bool:
    ready = ctx.data / "ready.json"
    return ready.exists() and json.loads(ready.read_text()).get("sizes") == asdict(ctx.sizes)


def make_data(ctx: Context):
    """ImageNet-sized JPEGs, their list, the training LMDB (--preset resnet) and an evaluation LMDB, once per
    machine."""
    s = ctx.sizes
    if data_ready(ctx):
        return {**json.loads((ctx.data / "ready.json").read_text())["figures"], "reused": True}, "reused"
    shutil.rmtree(ctx.data, ignore_errors=True)
    ctx.data.mkdir(parents=True)
    figures, start = {"reused": False, "images": s.images, "unique": s.unique}, time.perf_counter()
    ctx.run(ctx.imgprep("sample", ctx.sample, "--classes", s.classes, "--train-per-class", s.unique // s.classes,
                        "--val-per-class", 1, "--seed", 1, "--grain", GRAIN))
    figures["sample_ms_per_image"] = round(1000 * (time.perf_counter() - start) / s.unique, 2)
    figures["linked"] = link_copies(ctx.sample / "train", s.images)
    ctx.run(ctx.imgprep("make-lists", ctx.sample, "--out", ctx.lists))
    mark = time.perf_counter()
    ctx.run(ctx.imgprep("build-lmdb", ctx.lists / "train.txt", ctx.sample / "train", ctx.train_db,
                        "--preset", "resnet", "--shuffle"))
    figures["build_resnet_ms_per_image"] = round(1000 * (time.perf_counter() - mark) / s.images, 3)
    entries = (ctx.lists / "train.txt").read_text().splitlines()
    (ctx.data / "val.txt").write_text("\n".join(entries[::max(1, len(entries) // s.val)][:s.val]) + "\n")
    ctx.run(ctx.imgprep("build-lmdb", ctx.data / "val.txt", ctx.sample / "train", ctx.val_db, "--preset", "resnet"))
    figures["seconds"] = round(time.perf_counter() - start, 1)
    (ctx.data / "ready.json").write_text(json.dumps({"sizes": asdict(s), "figures": figures}))
    return figures, (f"{s.images:,} JPEGs ({s.unique:,} made by `imgprep sample --grain {GRAIN}`, "
                     f"{figures['sample_ms_per_image']} ms each; the rest linked under more names), "
                     f"LMDB built at {figures['build_resnet_ms_per_image']} ms per image, "
                     f"{figures['seconds']} s in all")


def link_copies(train: Path, images: int) -> int:
    """Hard links of the class folders' images under new names until `train` holds `images` files: the
    same bytes, so the same decoding cost, for a fraction of the time making them takes."""
    made = sorted(p for p in train.rglob("*.JPEG"))
    count, copy = len(made), 0
    while count < images:
        copy += 1
        for path in made[:images - count]:
            os.link(path, path.with_name(f"{path.stem}_copy{copy}{path.suffix}"))
        count = min(images, count + len(made))
    return count - len(made)


@step(2, "data", 30, 8, gate="")
def data(ctx: Context):
    """ImageNet-sized JPEGs, their list, the training LMDB (--preset resnet) and an evaluation LMDB, once per
    machine."""
    return make_data(ctx)


def bench(ctx: Context, db, *args) -> list[dict]:
    _, out = ctx.run(ctx.imgprep("bench-loader", db, "--device", ctx.sizes.device, *args, "--json"))
    rows = last_json(out)
    broken = [f"{r['source']}: {r['note']}" for r in rows if r["images_per_s"] is None]
    if broken:
        raise StepFailed("; ".join(broken)[:400], {"rows": rows})
    return rows


def bench_table(rows: list[dict]) -> str:
    from imgprep.loading.bench import BenchRow, format_table

    return format_table([BenchRow(**row) for row in rows])


def bench_step(ctx: Context, db, *args):
    rows = bench(ctx, db, *args)
    return {"rows": rows}, bench_table(rows)


@step(2, "bench-loader", 50, 18)
def headline(ctx: Context):
    """bench-loader: the loader (caffe policy), decode only, CaffeDataset, DALI's file reader and a torch
    DataLoader on the originals."""
    s = ctx.sizes
    return bench_step(ctx, ctx.train_db, "--batch", s.batch, "--threads", s.threads, "--seconds", s.seconds,
                      "--compare", ctx.sample / "train", "--torch-workers", s.workers)


@step(2, "bench-policies", 42, 10)
def policies(ctx: Context):
    """bench-loader --policy all: one row per policy on the shorter-256 records."""
    s = ctx.sizes
    return bench_step(ctx, ctx.train_db, "--batch", s.batch, "--threads", s.threads, "--seconds", s.policy_seconds,
                      "--policy", "all", "--torch-workers", s.workers)


@step(2, "feed-cpu", 12, 5)
def feed_cpu(ctx: Context):
    """The feed's CPU time per record while the whole GPU pipeline runs (scripts/feed_in_pipeline.py)."""
    s = ctx.sizes
    _, out = ctx.run(ctx.script("scripts/feed_in_pipeline.py", ctx.train_db, "--batch", s.batch, "--threads", s.threads,
                                "--seconds", s.feed_seconds, "--device", s.device, "--policy", "caffe"))
    figures = last_json(out)
    return figures, md_table(list(figures), [list(figures.values())])


@step(2, "feed-per-policy", 18, 8)
def feed_per_policy(ctx: Context):
    """benchmarks/bench_feed.py: the feed alone, every policy, CPU time per record (first epoch, later
    epochs, with DALI's intake) against the 10 us goal, on its own ImageNet-sized LMDB."""
    s = ctx.sizes
    _, out = ctx.run(ctx.script("benchmarks/bench_feed.py", "--images", s.images, "--workdir", ctx.data / "feed",
                                "--batch", s.batch, "--rounds", s.source_runs, "--records", s.feed_records))
    tables = md_tables(out)
    rows = [{k: number(v) for k, v in row.items()} for row in (tables[0] if tables else [])]
    return {"rows": rows}, out.strip()


@step(2, "bench-resnet480", 35, 8)
def resnet480(ctx: Context):
    """The resnet policy on the shorter-480 records it is meant for (build-lmdb --preset resnet480, then
    bench-loader)."""
    s = ctx.sizes
    if not (ctx.train480_db / "data.mdb").exists():
        ctx.run(ctx.imgprep("build-lmdb", ctx.lists / "train.txt", ctx.sample / "train", ctx.train480_db,
                            "--preset", "resnet480", "--shuffle"))
    return bench_step(ctx, ctx.train480_db, "--batch", s.batch, "--threads", s.threads, "--seconds",
                      s.policy_seconds, "--policy", "resnet", "--torch-workers", s.workers)


@step(2, "bench-split", 28, 8)
def split(ctx: Context):
    """bench-loader --cpu-share 0.35: a CPU-decoding pipeline beside the GPU one."""
    s = ctx.sizes
    return bench_step(ctx, ctx.train_db, "--batch", s.batch, "--threads", s.threads, "--seconds", s.policy_seconds,
                      "--cpu-share", 0.35, "--cpu-threads", s.threads, "--torch-workers", s.workers)


# ---- tier 3: at scale ----------------------------------------------------------------------------------


@step(3, "data", 30, 8, gate="")
def data_again(ctx: Context):
    """Tier 2's data, reused (made again only on a fresh machine)."""
    return make_data(ctx)


@step(3, "train-feeds", 50, 15)
def train_feeds(ctx: Context):
    """ResNet-50 (AMP, channels_last) fed by synthetic batches, the loader and a torch DataLoader; center and
    ten-crop evaluation."""
    s = ctx.sizes
    _, out = ctx.run(ctx.script("scripts/bench_train.py", ctx.train_db, "--originals", ctx.sample / "train",
                                "--list", ctx.lists / "train.txt", "--val", ctx.val_db, "--batch", s.train_batch,
                                "--workers", s.workers, "--threads", s.threads, "--warmup", s.train_warmup,
                                "--steps", s.train_steps), rehearsal=True)
    figures = last_json(out)
    base = figures["rows"][0]["images_per_s"]
    rows = [[r["feed"], f"{r['images_per_s']:,.0f}", r["ms_per_step"],
             f"{r['images_per_s'] / base:.2f}" if not r["feed"].startswith("evaluation") else "", r["note"]]
            for r in figures["rows"]]
    head = (f"{figures['gpu'] or figures['device']}, batch {figures['batch']}, {figures['steps']} steps after "
            f"{figures['warmup']}")
    return figures, head + "\n\n" + md_table(["feed", "img/s", "ms/step", "x synthetic", "note"], rows)


@step(3, "example", 35, 10)
def example(ctx: Context):
    """examples/train_resnet50.py --steps over more than one epoch, evaluating center and ten-crop after each."""
    s = ctx.sizes
    _, out = ctx.run(ctx.script("examples/train_resnet50.py", ctx.train_db, "--steps", s.example_steps, "--batch",
                                s.example_batch, "--threads", s.threads, "--val", ctx.val_db, "--eval", "center",
                                "--eval", "ten-crop"), rehearsal=True)
    rates = [float(r.replace(",", "")) for r in re.findall(r"step \d+ loss \S+ ([\d,]+) img/s", out)]
    epochs = re.findall(r"^epoch (\d+): (\d+) images in ([\d.]+)s", out, re.M)
    evals = re.findall(r"^epoch (\d+) eval (\S+): top-1 ([\d.]+)% top-5 ([\d.]+)%", out, re.M)
    steps = sum(-(-int(n) // s.example_batch) for _, n, _ in epochs)
    figures = {"img_per_s_reports": rates, "epochs": [{"epoch": int(e), "images": int(n), "seconds": float(t)}
                                                       for e, n, t in epochs],
               "evaluations": [{"epoch": int(e), "mode": m, "top1": float(a), "top5": float(b)}
                               for e, m, a, b in evals],
               "steps": steps}
    if steps != s.example_steps or len(evals) != 2 * len(epochs):
        raise StepFailed(f"ran {steps} steps in {len(epochs)} epochs with {len(evals)} evaluations, "
                         f"not {s.example_steps} steps", figures)
    return figures, "```\n" + "\n".join(line for line in out.splitlines() if line.startswith("epoch")) + "\n```"


@step(3, "build-cores", 75, 14)
def build_cores(ctx: Context):
    """benchmarks/bench_cores.py: build-lmdb --preset caffe at 1-16 jobs, then shards built at once + merge."""
    from imgprep.env import pil_build

    s = ctx.sizes
    where = ctx.work / "cores"
    try:
        _, out = ctx.run(ctx.script("benchmarks/bench_cores.py", "--list", ctx.lists / "train.txt", "--root",
                                    ctx.sample / "train", "--workdir", where, "--jobs", s.jobs, "--shards", s.shards,
                                    "--preset", "caffe"))
    finally:
        shutil.rmtree(where, ignore_errors=True)  # gigabytes of raw records
    pil = pil_build()["PIL"]
    tables = [[{k: number(v) for k, v in row.items()} for row in table] for table in md_tables(out)]
    return {"PIL": pil, "tables": tables}, f"PIL: {pil}\n\n" + out.strip()


# ---- the run ---------------------------------------------------------------------------------------------


def claim(folder: Path, marker: str | None, allowed: tuple = ()) -> None:
    """Makes `folder` this check's own: new, empty, marked as ours, or holding only our files."""
    if folder.exists() and not folder.is_dir():
        raise SystemExit(f"gpu-check: {folder} is not a folder")
    if folder.exists():
        others = [p.name for p in folder.iterdir() if p.name not in allowed and p.name != marker]
        if others and not (marker and (folder / marker).exists()):
            raise SystemExit(f"gpu-check: {folder} holds files that are not the check's own "
                             f"({', '.join(sorted(others)[:5])}); name another folder, or empty this one yourself")
    folder.mkdir(parents=True, exist_ok=True)
    if marker:
        (folder / marker).write_text("Made by scripts/gpu-check.sh, which reuses and replaces what is in it.\n")


class Summary:
    """summary.json and report.md: every step run on this machine (kept in WORK), copied to OUT after each."""

    def __init__(self, work: Path, out: Path, plan: dict):
        self.work, self.out = work, out
        saved = work / "summary.json"
        self.data = json.loads(saved.read_text()) if saved.exists() else {"steps": [], "tiers": {}}
        if self.data.get("plan", {}).get("dry_run", plan["dry_run"]) != plan["dry_run"]:
            self.data = {"steps": [], "tiers": {}}
        self.data["plan"] = plan
        self.reports = self.data.setdefault("reports", {})

    def record(self, entry: dict, report: str) -> None:
        key = f"{entry['tier']}:{entry['name']}"
        self.data["steps"] = [s for s in self.data["steps"] if f"{s['tier']}:{s['name']}" != key] + [entry]
        order = [(st.tier, st.name) for st in STEPS]
        self.data["steps"].sort(key=lambda s: order.index((s["tier"], s["name"])))
        self.reports[key] = report
        self.save()

    def tier(self, tier: int, figures: dict) -> None:
        self.data["tiers"][str(tier)] = figures
        self.save()

    def save(self) -> None:
        text = json.dumps(self.data, indent=1) + "\n"
        (self.work / "summary.json").write_text(text)
        (self.out / "summary.json").write_text(text)
        (self.out / "report.md").write_text(self.markdown())

    def markdown(self) -> str:
        plan = self.data["plan"]
        lines = [f"# imgprep GPU check{' (dry run on a CPU)' if plan['dry_run'] else ''}", "",
                 f"{plan['machine']}; sizes: {plan['sizes']['images']:,} images, batch {plan['sizes']['batch']}", ""]
        for tier, figures in sorted(self.data["tiers"].items()):
            lines.append(f"- tier {tier}: {figures['seconds']} s of a {figures['budget_s']} s budget; "
                         f"{figures['passed']} passed, {figures['failed']} failed, {figures['skipped']} skipped")
        for entry in self.data["steps"]:
            key = f"{entry['tier']}:{entry['name']}"
            lines += ["", f"## tier {entry['tier']}, {entry['name']}: {entry['status']} ({entry['seconds']} s)", "",
                      entry["what"], "", self.reports.get(key, "")]
        return "\n".join(lines) + "\n"


def machine() -> str:
    gpu = shutil.which("nvidia-smi")
    name = ""
    if gpu:
        query = subprocess.run([gpu, "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True,
                               text=True)
        name = query.stdout.strip().replace("\n", "; ")
    return f"{os.cpu_count()} CPU cores" + (f", {name}" if name else ", no GPU")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_tier(ctx: Context, summary: Summary, tier: int, budget: float) -> dict:
    start = time.monotonic()
    ctx.deadline = start + budget
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    blocked = None  # the gate step that failed
    for st in [s for s in STEPS if s.tier == tier]:
        left = ctx.deadline - time.monotonic()
        estimate = st.dry_estimate if ctx.dry else st.estimate
        if st.run in (data, data_again) and data_ready(ctx):
            estimate = 1
        entry = {"tier": tier, "name": st.name, "what": st.what, "estimate_s": estimate, "figures": {}}
        ctx.commands = []
        report = ""
        if blocked or estimate > left:
            entry["status"] = (f"skipped: {blocked} failed" if blocked else
                               f"skipped: would not fit (about {estimate:.0f} s, {max(0, left):.0f} s left)")
            entry["seconds"] = 0
            counts["skipped"] += 1
        else:
            ctx.log.write(f"\n===== tier {tier}: {st.name} ({estimate:.0f} s estimated, {left:.0f} s left)\n")
            ctx.log.flush()
            began, cpu = time.monotonic(), children_cpu()
            try:
                entry["figures"], report = st.run(ctx)
                entry["status"] = "passed"
                counts["passed"] += 1
            except StepFailed as e:
                entry["status"] = f"failed: {e.args[0]}"
                entry["figures"] = e.args[1] if len(e.args) > 1 else {}
                counts["failed"] += 1
            except Exception as e:  # noqa: BLE001 - a step's own bug is recorded, the tier goes on
                entry["status"] = f"failed: {type(e).__name__}: {e}"[:500]
                counts["failed"] += 1
            if st.gate is not None and entry["status"] != "passed" and re.search(st.gate, entry["status"]):
                blocked = st.name
            entry["seconds"] = round(time.monotonic() - began, 1)
            entry["cpu_s"] = round(children_cpu() - cpu, 1)  # of its processes (DataLoader workers, builds)
            ctx.log.write(f"----- {st.name}: {entry['status']} in {entry['seconds']} s\n")
        entry["commands"] = ctx.commands
        print(f"tier {tier} {st.name}: {entry['status']} ({entry['seconds']} s)", file=sys.stderr, flush=True)
        summary.record(entry, report)
    figures = {"budget_s": budget, "seconds": round(time.monotonic() - start, 1), **counts}
    summary.tier(tier, figures)
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tier", type=int, action="append", choices=sorted(TIER_BUDGETS),
                        help="run this tier (repeatable; default: all three)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for each tier (default: "
                             + ", ".join(f"{t}: {b}" for t, b in TIER_BUDGETS.items()) + ")")
    parser.add_argument("--dry-run", action="store_true", help="the rehearsal on a CPU: tiny sizes, DALI's CPU mode")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "build" / "gpu-check"))
    parser.add_argument("--work", type=Path, default=None,
                        help="data and state kept between tiers (default: /tmp/imgprep-gpu; dry run: "
                             "build/gpu-check-work)")
    parser.add_argument("--site", type=Path, default=None, help="an unpacked DALI site folder to put first on the path")
    args = parser.parse_args(argv)
    if args.site:
        sys.path.insert(0, str(args.site))  # the driver's own imports of imgprep need its lmdb, plyvel
    work = args.work or (ROOT / "build" / "gpu-check-work" if args.dry_run else Path("/tmp/imgprep-gpu"))
    claim(work, WORK_MARKER)
    claim(args.out, None, OUT_FILES)
    sizes = DRY if args.dry_run else REAL
    tiers = args.tier or sorted(TIER_BUDGETS)
    plan = {"dry_run": args.dry_run, "sizes": asdict(sizes), "machine": machine(), "tier_budgets_s": TIER_BUDGETS,
            "site": str(args.site) if args.site else None}
    summary = Summary(work, args.out, plan)
    with (args.out / "log.txt").open("w") as log:
        ctx = Context(sizes, args.dry_run, work, args.out, args.site, log)
        results = {tier: run_tier(ctx, summary, tier, args.budget if args.budget is not None else TIER_BUDGETS[tier])
                   for tier in tiers}
    for tier, figures in results.items():
        print(f"tier {tier}: {figures['passed']} passed, {figures['failed']} failed, {figures['skipped']} skipped "
              f"in {figures['seconds']} s (budget {figures['budget_s']} s)", file=sys.stderr)
    return 1 if any(f["failed"] for f in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
