"""Training speed of aaekit's engine against a plain PyTorch loop and against the machine's matmul ceiling.

Everything that is compared runs in this one process, in alternating rounds (the order rotates every round),
so that a noisy, shared machine slows every contender alike; the figure reported for each is the median of
its rounds. Run it from the repository root:

    .venv/bin/python benchmarks/throughput.py           # the paper's likelihood setting (minutes)
    .venv/bin/python benchmarks/throughput.py --quick   # tiny nets and budget: checks that it works (seconds)

It prints a table and writes benchmarks/results/throughput.json (figures, versions, threads, CPU, GPU), with
each contender's step split by torch.profiler into matrix products, optimizer, dtype casts, data loading,
other operators, autograd bookkeeping and Python.
On a machine with a GPU every contender runs on it (the engine where Accelerate puts it, the plain loop and
the replayed matmuls beside it), timed with the GPU synchronised, and fp16 is timed beside bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "gaussian.toml"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("AAEKIT_CACHE_DIR", str(ROOT / ".cache" / "aaekit"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

# Where Accelerate puts the engine; the plain loop and the matmul replays run there too.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
    """GPU work is asynchronous: timing stops only once everything queued has run."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


# The paper's likelihood setting (recipes/gaussian.toml); --quick shrinks the nets so a smoke test takes
# seconds.
FULL = {
    "hidden": 1000,
    "batch": 100,
    "limit": 0,
    "warmup": 5,
    "rounds": 7,
    "steps": 20,
    "curve_steps": 300,
    "epoch_sizes": [10_000, 30_000, 60_000],
    "cli_steps": 20,
    "cli_repeats": 5,
    "breakdown_steps": 5,
    "breakdown_rounds": 3,
    "long_steps": 1800,
}
QUICK = {
    "hidden": 64,
    "batch": 100,
    "limit": 2000,
    "warmup": 2,
    "rounds": 2,
    "steps": 3,
    "curve_steps": 20,
    "epoch_sizes": [500, 1000, 2000],
    "cli_steps": 3,
    "cli_repeats": 1,
    "breakdown_steps": 2,
    "breakdown_rounds": 1,
    "long_steps": 12,
}


# ---------------------------------------------------------------------------------------------------------
# Contender 1: aaekit's engine, built from the recipe exactly as `aaekit run` builds it.


def recipe_overrides(cfg: dict, *extra: str) -> list[str]:
    h = cfg["hidden"]
    out = [
        f"encoder.hidden=[{h},{h}]",
        f"decoder.hidden=[{h},{h}]",
        f"codes.z.discriminator.hidden=[{h},{h}]",
        f"train.batch_size={cfg['batch']}",
        "train.pictures=false",
    ]
    if cfg["limit"]:
        out.append(f"data.limit={cfg['limit']}")
    return out + list(extra)


def make_trainer(overrides: list[str], run_dir: Path):
    """A prepared Trainer. Accelerate keeps one process-wide state, so it is reset before each new one; a
    prepared trainer keeps the precision it was prepared with (checked by `matmul_dtypes` below)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from aaekit.engine import Trainer
    from aaekit.plugins import get_registry
    from aaekit.recipe import load_recipe

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    registry = get_registry()
    recipe = load_recipe(RECIPE, overrides, registry)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(recipe, run_dir, registry)
    trainer.prepare(None)
    return trainer


class EngineSteps:
    """One step exactly as `Trainer.fit` takes it: next batch from the engine's own stream, the three
    phases (replayed as a CUDA graph where the recipe says so), and the running sums of the metrics (no host
    sync; fit syncs once per log line)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.sums: dict = {}

    def metrics(self) -> dict:
        t = self.trainer
        if t.batches.position + t.train_cfg["batch_size"] > t.batches.n:
            t.batches.start_pass()
        return t.step(*t.next_batch())

    def __call__(self) -> None:
        for k, v in self.metrics().items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()

    def reconstruction_losses(self, steps: int) -> list[float]:
        # a replayed graph overwrites its outputs on the next step: keep copies
        losses = [self.metrics()["loss/reconstruction"].clone() for _ in range(steps)]
        return torch.stack(losses).float().tolist()


# ---------------------------------------------------------------------------------------------------------
# Contender 2: the same model and schedule, written the way a typical user writes it.


def mlp(sizes):
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class PlainLoop:
    """DataLoader over a TensorDataset, three Adam optimizers, reconstruction / discriminator / generator
    phases one after another, the loss read with .item() for the progress line."""

    def __init__(self, images: torch.Tensor, hidden: int, batch: int, seed: int = 0):
        torch.manual_seed(seed)
        self.encoder = mlp([784, hidden, hidden, 8]).to(DEVICE)
        self.decoder = mlp([8, hidden, hidden, 784]).to(DEVICE)
        self.discriminator = mlp([8, hidden, hidden, 1]).to(DEVICE)
        self.opt_ae = torch.optim.Adam([*self.encoder.parameters(), *self.decoder.parameters()], lr=1e-3)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999))
        self.opt_g = torch.optim.Adam(self.encoder.parameters(), lr=2e-4, betas=(0.5, 0.999))
        dataset = torch.utils.data.TensorDataset(images.reshape(len(images), -1).float() / 255.0)
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True)
        self.batches = iter(self.loader)
        self.last_loss = 0.0

    def next_batch(self) -> torch.Tensor:
        try:
            return next(self.batches)[0].to(DEVICE)
        except StopIteration:
            self.batches = iter(self.loader)
            return next(self.batches)[0].to(DEVICE)

    def __call__(self) -> None:
        x = self.next_batch()
        # reconstruction
        self.opt_ae.zero_grad()
        recon = torch.sigmoid(self.decoder(self.encoder(x)))
        loss = F.mse_loss(recon, x)
        loss.backward()
        self.opt_ae.step()
        # discriminator
        self.opt_d.zero_grad()
        z_real = 5.0 * torch.randn(x.shape[0], 8, device=DEVICE)
        z_fake = self.encoder(x).detach()
        d_real, d_fake = self.discriminator(z_real), self.discriminator(z_fake)
        d_loss = F.binary_cross_entropy_with_logits(
            d_real, torch.ones_like(d_real)
        ) + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
        d_loss.backward()
        self.opt_d.step()
        # generator
        self.opt_g.zero_grad()
        d_gen = self.discriminator(self.encoder(x))
        g_loss = F.binary_cross_entropy_with_logits(d_gen, torch.ones_like(d_gen))
        g_loss.backward()
        self.opt_g.step()
        self.last_loss = loss.item()


# ---------------------------------------------------------------------------------------------------------
# Contender 3: the matmul ceiling - the very matrix products of one step, replayed with nothing else.

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


class RecordMatmuls(TorchDispatchMode):
    """Records each matrix product's operator and its operands' shapes, strides and dtypes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in MATMULS:
            spec = [(a.shape, a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
            self.calls.append((func, spec, dict(kwargs)))
        return func(*args, **kwargs)


def one_step_profile(step) -> tuple[list, int]:
    """The matmuls of one step and its FLOP count (torch.utils.flop_counter)."""
    recorder = RecordMatmuls()
    with recorder:
        step()
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return recorder.calls, counter.get_total_flops()


class MatmulReplay:
    def __init__(self, calls: list):
        self.calls = []
        for func, spec, kwargs in calls:
            args = []
            for a in spec:
                if isinstance(a, tuple) and len(a) == 3 and isinstance(a[2], torch.dtype):
                    t = torch.empty_strided(a[0], a[1], dtype=a[2], device=DEVICE)
                    t.normal_()
                    args.append(t)
                else:
                    args.append(a)
            self.calls.append((func, args, kwargs))
        counter = FlopCounterMode(display=False)
        with counter:
            self()
        self.flops = counter.get_total_flops()

    def __call__(self) -> None:
        for func, args, kwargs in self.calls:
            func(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Where a step's time goes: torch.profiler's self time of every operator, grouped.

MATMUL_NAMES = {"aten::mm", "aten::addmm", "aten::bmm"}
CAST_NAMES = {"aten::copy_", "aten::_to_copy"}
# matmul: matrix products; optimizer: inside Optimizer.step/zero_grad; casts: copy_/_to_copy (autocast's dtype
# casts among them); data: inside a DataLoader's next(); other_ops: every other operator; autograd: the
# autograd engine's own bookkeeping; python: wall time outside any operator.
BREAKDOWN_CATEGORIES = ("matmul", "optimizer", "casts", "data", "other_ops", "autograd", "python")


def category_of(event) -> str:
    """Everything inside an optimizer's step/zero_grad is the optimizer's (the plain loop's unfused Adam is
    many small operators), everything inside a DataLoader's next() is data loading; else the operator
    decides."""
    node = event
    while node is not None:  # the event itself, then its enclosing spans
        if node.name.startswith("Optimizer."):
            return "optimizer"
        if "DataLoader" in node.name:
            return "data"
        node = node.cpu_parent
    name = event.name
    if name in MATMUL_NAMES:
        return "matmul"
    if name in CAST_NAMES:
        return "casts"
    return "other_ops" if name.startswith("aten::") else "autograd"


def profile_steps(step, steps: int) -> tuple[float, dict]:
    """Wall milliseconds of `steps` profiled steps, and the self time (ms) of each category in them."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize()
        wall_ms = 1e3 * (time.perf_counter() - start)
    ms = dict.fromkeys(BREAKDOWN_CATEGORIES, 0.0)
    for event in prof.events():
        ms[category_of(event)] += event.self_cpu_time_total / 1e3
    return wall_ms, ms


def time_breakdowns(contenders: dict, cfg: dict) -> dict:
    """Milliseconds per step by category for each contender (host time: on a GPU, what the CPU spends
    launching), profiled in alternating rounds like the timing. The profiler slows each operator call a
    little, so the categories add up to the profiled step time (`profiled_step_ms`), somewhat above the
    unprofiled one; "python" is the wall time outside any operator."""
    steps = cfg["breakdown_steps"]
    # A contender's first profiled steps are slow (bf16's casts measured 17, then 10, then 3.6 ms a step in
    # three 5-step profiles in a row, and 3.6 ms at once after 40 unprofiled steps), so unprofiled steps go
    # first.
    for step in contenders.values():
        for _ in range(8 * steps):
            step()
    wall = dict.fromkeys(contenders, 0.0)
    split = {n: dict.fromkeys(BREAKDOWN_CATEGORIES, 0.0) for n in contenders}
    for _ in range(cfg["breakdown_rounds"]):
        for n, step in contenders.items():
            for _ in range(steps):  # as in a timing round, its steps follow steps of its own
                step()
            wall_ms, ms = profile_steps(step, steps)
            wall[n] += wall_ms
            for c, v in ms.items():
                split[n][c] += v
    total = steps * cfg["breakdown_rounds"]
    out = {}
    for n in contenders:
        ms = {c: v / total for c, v in split[n].items()}
        ms["python"] = max(0.0, wall[n] / total - sum(ms.values()))
        out[n] = {"profiled_step_ms": wall[n] / total, "ms_per_step": ms}
    return out


# ---------------------------------------------------------------------------------------------------------


def alternate(contenders: dict, cfg: dict) -> dict[str, list[float]]:
    """Warm every contender up, then time `steps` calls of each per round, rotating the order each round.
    Returns seconds per call, one figure per round."""
    for fn in contenders.values():
        for _ in range(cfg["warmup"]):
            fn()
    names = list(contenders)
    per_call = {n: [] for n in names}
    for r in range(cfg["rounds"]):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            synchronize()
            start = time.perf_counter()
            for _ in range(cfg["steps"]):
                contenders[n]()
            synchronize()
            per_call[n].append((time.perf_counter() - start) / cfg["steps"])
    return per_call


def cli_timings(cfg: dict, work: Path) -> dict:
    """`aaekit --help` wall time (and whether it imported torch); `aaekit run` start to first step and peak
    memory, as a user's run does it (a fresh process, dataset cached)."""
    exe = [sys.executable, "-m", "aaekit"]
    help_times = []
    for _ in range(cfg["cli_repeats"]):
        start = time.perf_counter()
        subprocess.run([*exe, "--help"], check=True, capture_output=True)
        help_times.append(time.perf_counter() - start)
    probe = (
        "import sys\nfrom aaekit.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)"
    )
    imported = subprocess.run([sys.executable, "-c", probe, "--help"], capture_output=True, text=True).stderr
    baseline = []
    for _ in range(cfg["cli_repeats"]):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        baseline.append(time.perf_counter() - start)

    run_dir = work / "cli-run"
    args = [
        *exe,
        "run",
        str(RECIPE),
        *recipe_overrides(cfg, f"train.max_steps={cfg['cli_steps']}", "train.log_every=1"),
        "--output-dir",
        str(run_dir),
    ]
    metrics = run_dir / "metrics.jsonl"
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=work)
    first_step = None
    while proc.poll() is None:
        if first_step is None and metrics.exists() and metrics.stat().st_size > 0:
            first_step = time.perf_counter() - start
        time.sleep(0.005)
    total = time.perf_counter() - start
    output = proc.stdout.read().decode(errors="replace")
    if proc.returncode:
        raise SystemExit(f"aaekit run failed ({proc.returncode}):\n{output}")
    if first_step is None:
        first_step = total
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    import resource

    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # largest child so far: the run
    return {
        "help_s": {"min": min(help_times), "median": statistics.median(help_times)},
        "python_startup_s": min(baseline),
        "help_imports_torch": "NO-TORCH" not in imported,
        "run_start_to_first_step_s": first_step,
        "run_total_s": total,
        "run_steps": cfg["cli_steps"],
        "run_peak_rss_mib": peak_kib / 1024,
        "run_last_samples_per_s": records[-1].get("samples_per_s") if records else None,
    }


def long_runs(cfg: dict, work: Path) -> dict:
    """`aaekit run` for `long_steps` steps with denormal flushing on and off (`run.flush_denormals`):
    samples/s per log window. Without flushing a CPU run slows down as Adam's running averages fill with
    denormals, long after the few hundred steps the alternating rounds above take."""
    out = {}
    windows = 6
    for flush in (True, False):
        run_dir = work / f"long-{'flush' if flush else 'no-flush'}"
        args = [
            sys.executable,
            "-m",
            "aaekit",
            "run",
            str(RECIPE),
            *recipe_overrides(
                cfg,
                f"train.max_steps={cfg['long_steps']}",
                f"train.log_every={max(1, cfg['long_steps'] // windows)}",
                f"run.flush_denormals={str(flush).lower()}",
            ),
            "--output-dir",
            str(run_dir),
        ]
        proc = subprocess.run(args, capture_output=True, text=True, cwd=work)
        if proc.returncode:
            raise SystemExit(f"aaekit run failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        out["flush" if flush else "no_flush"] = {
            "steps": [r["step"] for r in records],
            "samples_per_s": [r["samples_per_s"] for r in records],
        }
    return out


def epoch_scaling(cfg: dict, work: Path) -> list[dict]:
    """Time of one full epoch (the engine's steps) as the training set grows."""
    out = []
    for size in cfg["epoch_sizes"]:
        trainer = make_trainer(recipe_overrides({**cfg, "limit": size}), work / f"epoch-{size}")
        step = EngineSteps(trainer)
        for _ in range(cfg["warmup"]):
            step()
        trainer.batches.start_pass()
        synchronize()
        start = time.perf_counter()
        for _ in range(trainer.steps_per_epoch):
            step()
        synchronize()
        seconds = time.perf_counter() - start
        out.append(
            {
                "train_size": size,
                "steps": trainer.steps_per_epoch,
                "epoch_s": seconds,
                "us_per_sample": 1e6 * seconds / (trainer.steps_per_epoch * cfg["batch"]),
            }
        )
        del trainer, step
    return out


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import accelerate

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    gpu = torch.cuda.get_device_name(0) if DEVICE.type == "cuda" else None
    return {
        "device": DEVICE.type,
        "gpu": gpu,
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": load,
        "bf16_matmul_units": "amx_bf16" in Path("/proc/cpuinfo").read_text()
        if Path("/proc/cpuinfo").exists()
        else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny nets and budget (seconds): a smoke test")
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 7; 2 with --quick)")
    parser.add_argument("--steps", type=int, help="steps per contender per round")
    parser.add_argument("--curve-steps", type=int, help="steps of the bf16-vs-fp32 loss curve (default 300)")
    parser.add_argument("--no-cli", action="store_true", help="skip the CLI start-up and peak-memory figures")
    parser.add_argument("--no-epochs", action="store_true", help="skip time per epoch vs training set size")
    parser.add_argument(
        "--no-long",
        action="store_true",
        help="skip the long `aaekit run`s with and without denormal flushing",
    )
    parser.add_argument("--batch", type=int, help="mini-batch size (default 100, the paper's)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "throughput.json")
    opts = parser.parse_args(argv)
    cfg = dict(QUICK if opts.quick else FULL)
    if opts.batch:
        cfg["batch"] = opts.batch
    if opts.rounds:
        cfg["rounds"] = opts.rounds
    if opts.steps:
        cfg["steps"] = opts.steps
    if opts.curve_steps:
        cfg["curve_steps"] = opts.curve_steps
    info = machine_info()
    work = Path(tempfile.mkdtemp(prefix="aaekit-bench-"))

    fp32 = make_trainer(recipe_overrides(cfg), work / "fp32")
    autocast = None
    contenders = {"aaekit_fp32": EngineSteps(fp32)}
    # fp16 needs a GPU (Accelerate's gradient scaler); bf16 runs on both.
    mixed = ("bf16", "fp16") if DEVICE.type == "cuda" else ("bf16",)
    for precision in mixed:
        trainer = make_trainer(recipe_overrides(cfg, f"run.mixed_precision={precision}"), work / precision)
        contenders[f"aaekit_{precision}"] = EngineSteps(trainer)
    if DEVICE.type == "cpu":  # bf16 on a CPU holds bf16 weights with fp32 masters; plain autocast beside it
        assert trainer.master_weights is not None
        autocast = make_trainer(
            recipe_overrides(cfg, "run.mixed_precision=bf16", "run.bf16_master_weights=false"),
            work / "bf16-autocast",
        )
        contenders["aaekit_bf16_autocast"] = EngineSteps(autocast)
    contenders["plain_fp32"] = PlainLoop(fp32.dataset.load("train").x, cfg["hidden"], cfg["batch"])
    # On a GPU: the engine with its step replayed as a CUDA graph (run.cuda_graphs), per precision. Replays
    # run no operators from Python, so their FLOPs, matmuls and ceiling are their eager twins'.
    graphed = {}
    if DEVICE.type == "cuda":
        for precision in ("fp32", *mixed):
            extra = ["run.cuda_graphs=on"] + (
                [] if precision == "fp32" else [f"run.mixed_precision={precision}"]
            )
            graphed[f"aaekit_graphs_{precision}"] = EngineSteps(
                make_trainer(recipe_overrides(cfg, *extra), work / f"graphs-{precision}")
            )
    twin = {n: n.replace("graphs_", "") for n in graphed}

    # Where each step's time goes. (Before denormal flushing, Adam and the casts profiled here after the
    # timing read twice as slow as at its start: the denormals that had built up in Adam's state by then.)
    breakdowns = time_breakdowns(contenders, cfg)
    # FLOPs and matmuls of one step of each; the ceilings replay those matmuls alone.
    profiles = {n: one_step_profile(fn) for n, fn in contenders.items()}
    dtypes = {
        n: sorted(
            {
                str(a[2]).removeprefix("torch.")
                for _, spec, _ in calls
                for a in spec
                if isinstance(a, tuple) and len(a) == 3
            }
        )
        for n, (calls, _) in profiles.items()
    }
    assert dtypes["aaekit_fp32"] == ["float32"] and "bfloat16" in dtypes["aaekit_bf16"], dtypes
    assert "aaekit_bf16_autocast" not in dtypes or "bfloat16" in dtypes["aaekit_bf16_autocast"], dtypes
    assert "aaekit_fp16" not in dtypes or "float16" in dtypes["aaekit_fp16"], dtypes
    replays = {f"ceiling_{n}": MatmulReplay(calls) for n, (calls, _) in profiles.items()}
    timed = alternate({**contenders, **graphed, **replays}, cfg)
    for n in graphed:
        profiles[n], dtypes[n], breakdowns[n] = profiles[twin[n]], dtypes[twin[n]], None
        timed[f"ceiling_{n}"], replays[f"ceiling_{n}"] = (
            timed[f"ceiling_{twin[n]}"],
            replays[f"ceiling_{twin[n]}"],
        )
    contenders.update(graphed)

    batch = cfg["batch"]
    results: dict = {}
    for n in contenders:
        sec = statistics.median(timed[n])
        ceiling_s = statistics.median(timed[f"ceiling_{n}"])
        ceiling_gflops = replays[f"ceiling_{n}"].flops / ceiling_s / 1e9
        flops = profiles[n][1]
        results[n] = {
            "samples_per_s": batch / sec,
            "samples_per_s_rounds": [batch / s for s in timed[n]],
            "step_ms": 1e3 * sec,
            "flops_per_step": flops,
            "gflops": flops / sec / 1e9,
            "ceiling_gflops": ceiling_gflops,
            "matmuls_per_step": len(profiles[n][0]),
            "matmul_dtypes": dtypes[n],
            "fraction_of_ceiling": flops / sec / 1e9 / ceiling_gflops,
            "time_breakdown": breakdowns[n],
        }
    plain = results["plain_fp32"]["samples_per_s"]
    speedups = {}
    for n in (n for n in contenders if n.startswith("aaekit_")):
        speedups[f"{n}_vs_plain_fp32"] = results[n]["samples_per_s"] / plain
        # The same comparison per round (both timed within the same round, so under the same load).
        speedups[f"{n}_vs_plain_fp32_per_round"] = [p / a for a, p in zip(timed[n], timed["plain_fp32"])]

    # A short loss curve, bf16 (and fp16 on a GPU) against fp32, from the same seed and the same batches.
    # On a GPU also each precision with its step replayed as a CUDA graph, which should match its eager run.
    del fp32, trainer, contenders, autocast, graphed
    curves = {}
    graph_runs = [f"graphs_{p}" for p in ("fp32", *mixed)] if DEVICE.type == "cuda" else []
    for name in ("fp32", *mixed, *graph_runs):
        precision = name.removeprefix("graphs_")
        extra = [] if precision == "fp32" else [f"run.mixed_precision={precision}"]
        if name in graph_runs:
            extra.append("run.cuda_graphs=on")
        trainer = make_trainer(recipe_overrides(cfg, *extra), work / f"curve-{name}")
        curves[name] = EngineSteps(trainer).reconstruction_losses(cfg["curve_steps"])
        del trainer
    window = max(1, cfg["curve_steps"] // 10)
    mean_of = lambda xs: sum(xs) / len(xs)  # noqa: E731
    curve = {"steps": cfg["curve_steps"], "window": window}
    for name, losses in curves.items():
        curve[name] = [mean_of(losses[i : i + window]) for i in range(0, cfg["curve_steps"], window)]
    for name in mixed:  # bf16's keeps its original key
        key = "final_relative_difference" if name == "bf16" else f"{name}_final_relative_difference"
        curve[key] = abs(curve[name][-1] - curve["fp32"][-1]) / curve["fp32"][-1]
    for name in graph_runs:  # a replayed step against the eager one of its precision, step by step
        eager = curves[name.removeprefix("graphs_")]
        curve[f"{name}_vs_eager_max_relative_difference"] = max(
            abs(a - b) / abs(b) for a, b in zip(curves[name], eager)
        )

    report = {
        "benchmark": "throughput",
        "quick": opts.quick,
        "machine": info,
        "setting": {
            "recipe": "recipes/gaussian.toml",
            "encoder": [784, cfg["hidden"], cfg["hidden"], 8],
            "decoder": [8, cfg["hidden"], cfg["hidden"], 784],
            "discriminator": [8, cfg["hidden"], cfg["hidden"], 1],
            "batch": batch,
            "optimizer": "adam",
            "bf16": (
                "bf16 weights with fp32 masters, compiled Adam loop (run.bf16_master_weights); "
                "aaekit_bf16_autocast: plain autocast"
                if DEVICE.type == "cpu"
                else "autocast"
            ),
            "rounds": cfg["rounds"],
            "steps_per_round": cfg["steps"],
            "warmup_steps": cfg["warmup"],
            "statistic": "median over alternating rounds",
            # both are process-wide: the plain loop, timed in the same process, gains from the
            # engine's CPU settings too, so the speed-ups are conservative
            "plain_loop_allocator": "glibc thresholds set by aaekit's Trainer (same process)",
            "plain_loop_denormals": "flushed on every thread by aaekit's Trainer (same process)",
        },
        "results": results,
        "speedups": speedups,
        "bf16_loss_curve": curve,
    }
    if not opts.no_cli:
        report["cli"] = cli_timings(cfg, work)
    if not opts.no_epochs:
        report["epoch_scaling"] = epoch_scaling(cfg, work)
    if not opts.no_long:
        report["long_runs"] = long_runs(cfg, work)
    report["machine"]["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None

    opts.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = opts.output.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(opts.output)
    print_table(report)
    print(f"written: {opts.output}")
    return 0


def print_table(report: dict) -> None:
    m = report["machine"]
    gpu = f"{m['gpu']} (GPU); " if m.get("gpu") else ""
    print(
        f"\n{gpu}{m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}; load "
        f"{m['load_average_at_start']}"
    )
    print(f"{'contender':<21}{'samples/s':>11}{'step ms':>9}{'GFLOP/s':>9}{'ceiling':>9}{'of ceiling':>11}")
    for n, r in report["results"].items():
        print(
            f"{n:<21}{r['samples_per_s']:>11.0f}{r['step_ms']:>9.1f}{r['gflops']:>9.1f}"
            f"{r['ceiling_gflops']:>9.1f}{100 * r['fraction_of_ceiling']:>10.0f}%"
        )
    print(f"\nwhere a step's time goes (ms, profiled; {'host time' if m.get('gpu') else 'CPU'}):")
    print(f"{'contender':<21}" + "".join(f"{c:>10}" for c in BREAKDOWN_CATEGORIES) + f"{'total':>8}")
    for n, r in report["results"].items():
        b = r["time_breakdown"]
        if b is None:  # a replayed CUDA graph runs no operators from Python
            continue
        print(
            f"{n:<21}"
            + "".join(f"{b['ms_per_step'][c]:>10.2f}" for c in BREAKDOWN_CATEGORIES)
            + f"{b['profiled_step_ms']:>8.1f}"
        )
    print(
        "   ".join(
            f"{k.removesuffix('_vs_plain_fp32').replace('_', ' ')} / plain fp32: {v:.2f}x"
            for k, v in report["speedups"].items()
            if not k.endswith("_per_round")
        )
    )
    c = report["bf16_loss_curve"]
    print(
        f"reconstruction loss after {c['steps']} steps: fp32 {c['fp32'][-1]:.4f}, bf16 {c['bf16'][-1]:.4f} "
        f"({100 * c['final_relative_difference']:.1f}% apart)"
    )
    if "fp16" in c:
        print(f"  fp16 {c['fp16'][-1]:.4f} ({100 * c['fp16_final_relative_difference']:.1f}% from fp32)")
    for k, v in c.items():
        if k.endswith("_vs_eager_max_relative_difference"):
            print(
                f"  {k.split('_vs_')[0].replace('_', ' ')} against eager: "
                f"at most {100 * v:.2f}% apart per step"
            )
    if "cli" in report:
        cli = report["cli"]
        print(
            f"aaekit --help {cli['help_s']['min']:.2f}s (python alone {cli['python_startup_s']:.2f}s, "
            f"imports torch: {cli['help_imports_torch']}); aaekit run start to first step "
            f"{cli['run_start_to_first_step_s']:.2f}s; peak RSS {cli['run_peak_rss_mib']:.0f} MiB"
        )
    for name, run in report.get("long_runs", {}).items():
        print(
            f"aaekit run, {name.replace('_', ' ')}: samples/s at steps {run['steps']}: "
            + ", ".join(f"{v:.0f}" for v in run["samples_per_s"])
        )
    for e in report.get("epoch_scaling", []):
        print(
            f"epoch of {e['train_size']:>6} images: {e['epoch_s']:7.2f}s  ({e['us_per_sample']:.0f} "
            f"us/sample)"
        )


if __name__ == "__main__":
    sys.exit(main())
