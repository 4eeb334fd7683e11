"""bf16 on a CPU with fp32 master weights (aaekit/cpu/master_weights.py): the same numbers as autocast,
checkpoints in fp32, exact resume, two ranks, and the torch fallback when no compiler is there."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import ONE_THREAD, assert_ranks_identical, launch_two_ranks, metric_lines
from test_schedule import gaussian_trainer
from torch.utils._python_dispatch import TorchDispatchMode

from aaekit.cpu.master_weights import (
    LOW_PRECISION_MODULES,
    MasterAdam,
    MasterSGD,
    MasterWeights,
    compiled_kernel,
)
from conftest import aaekit, aaekit_process, prepared_trainer, two_code_recipe

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the compiled update is built on Linux"
)


def test_every_low_precision_module_runs_under_autocast_with_bf16_weights():
    """Autocast must take fp32 inputs to these modules' bf16 weights; one it does not cover would fail
    here."""
    for cls in LOW_PRECISION_MODULES:
        if cls is torch.nn.Linear:
            module, x = cls(4, 3), torch.randn(2, 4)
        else:
            dims = int(cls.__name__[-2])
            module, x = cls(2, 3, 3), torch.randn(1, 2, *([6] * dims))
        expected = module(x)
        module.to(torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = module(x)
        assert y.dtype == torch.bfloat16, cls
        torch.testing.assert_close(y.float(), expected, rtol=0.05, atol=0.05)


def small_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(30, 200), torch.nn.ReLU(), torch.nn.Linear(200, 5), torch.nn.LayerNorm(5)
    )


def one_update(decoupled: bool, kernel: bool):
    """One autocast step of a small net through MasterAdam (compiled loop or torch fallback) and through
    torch's Adam/AdamW on fp32 weights, from the same weights and batch."""
    reference, net = small_net(0), small_net(0)
    masters = MasterWeights(net, [net])
    opt = MasterAdam(
        net.parameters(), masters, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, decoupled=decoupled
    )
    if not kernel:
        opt.kernel = None
    ref_opt = (torch.optim.AdamW if decoupled else torch.optim.Adam)(
        reference.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, fused=True
    )
    x = torch.randn(16, 30, generator=torch.Generator().manual_seed(1))
    for model, optimizer in ((net, opt), (reference, ref_opt)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x).float().square().mean().backward()
        optimizer.step()
    return net, masters, opt, reference


@linux_only
@pytest.mark.parametrize("decoupled", [False, True])
def test_compiled_update_is_torchs_adam_and_writes_the_rounded_weights(decoupled):
    # a C compiler is there: the loop is really built
    assert compiled_kernel()[1] is None, compiled_kernel()[1]
    # it shares torch's OpenMP runtime instead of loading a second one (two thread pools would fight for the
    # cores)
    maps = open("/proc/self/maps").read().splitlines()
    assert len({line.split()[-1] for line in maps if "libgomp" in line}) == 1
    net, masters, opt, reference = one_update(decoupled, kernel=True)
    assert opt.kernel is not None
    assert len(masters) == 4  # the two Linear layers' weights and biases; LayerNorm stays fp32
    assert net[2].weight.dtype == torch.bfloat16 and net[3].weight.dtype == torch.float32
    weights, expected = net.state_dict(), reference.state_dict()
    for name, value in expected.items():
        assert weights[name].dtype == torch.float32
        # last-bit differences only (one multiplication by a reciprocal where torch divides)
        torch.testing.assert_close(weights[name], value, rtol=0, atol=1e-6)
        assert not torch.equal(weights[name], small_net(0).state_dict()[name])  # it moved
    for layer in (net[0], net[2]):  # the bf16 weights are exactly the masters rounded
        for p in layer.parameters():
            assert torch.equal(p, masters.master_of[p].to(torch.bfloat16))
    state = opt.state_dict()["state"][0]
    assert state["exp_avg"].dtype == torch.float32 and float(state["step"]) == 1.0


def test_torch_fallback_is_bit_identical_to_torchs_adam():
    net, masters, opt, reference = one_update(decoupled=False, kernel=False)
    weights = net.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in reference.state_dict().items())


@pytest.mark.parametrize("kernel", [pytest.param(True, marks=linux_only), False], ids=["compiled", "torch"])
@pytest.mark.parametrize(
    "momentum,nesterov,weight_decay", [(0.9, True, 1e-3), (0.9, False, 0.0), (0.0, False, 1e-3)]
)
def test_sgd_through_masters_is_bit_identical_to_torchs(kernel, momentum, nesterov, weight_decay):
    """The compiled SGD loop and its torch fallback both give torch's SGD on fp32 weights bit for bit (the
    first step creates the momentum buffers, the later ones use them)."""
    reference, net = small_net(0), small_net(0)
    masters = MasterWeights(net, [net])
    opt = MasterSGD(
        net.parameters(), masters, lr=0.05, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay
    )
    if kernel:
        assert opt.kernel is not None, compiled_kernel()[1]
    else:
        opt.kernel = None
    ref_opt = torch.optim.SGD(
        reference.parameters(),
        lr=0.05,
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=weight_decay,
        foreach=True,
    )
    x = torch.randn(16, 30, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        for model, optimizer in ((net, opt), (reference, ref_opt)):
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(x).float().square().mean().backward()
            optimizer.step()
    weights = net.state_dict()
    differing = [k for k, v in reference.state_dict().items() if not torch.equal(weights[k], v)]
    assert not differing, differing
    assert not torch.equal(weights["0.weight"], small_net(0).state_dict()["0.weight"])  # it moved
    assert net[0].weight.dtype == torch.bfloat16 and torch.equal(
        net[0].weight, weights["0.weight"].bfloat16()
    )
    if momentum:
        buffers, expected = opt.state_dict()["state"], ref_opt.state_dict()["state"]
        assert len(buffers) == 6 and all(
            s["momentum_buffer"].dtype == torch.float32 for s in buffers.values()
        )
        assert all(
            torch.equal(buffers[i]["momentum_buffer"], expected[i]["momentum_buffer"]) for i in expected
        )


def test_optimizer_state_reloads_in_fp32():
    """torch's load_state_dict casts state to each parameter's dtype; the moments must stay fp32, not bf16."""
    net, masters, opt, _ = one_update(decoupled=False, kernel=False)
    saved = opt.state_dict()
    fresh = MasterAdam(net.parameters(), masters, lr=1e-3)
    fresh.load_state_dict(saved)
    for index, p in enumerate(net.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert fresh.state[p][key].dtype == torch.float32
            assert torch.equal(fresh.state[p][key], saved["state"][index][key])


@pytest.mark.parametrize("recipe", ["gaussian", "semi-supervised with SGD"])
def test_engine_bf16_steps_match_autocast(tmp_path, recipe):
    """Three full steps of the paper's schedule (the semi-supervised one: two codes, a classification phase
    with SGD + momentum): with master weights (compiled loop, and torch fallback) against plain autocast from
    the same seed. The fallback is bit-identical; the loop differs in last bits."""
    runs = {}
    for name, extra in (("autocast", ["run.bf16_master_weights=false"]), ("loop", []), ("fallback", [])):
        if recipe == "gaussian":
            trainer = gaussian_trainer(tmp_path / name, "run.mixed_precision=bf16", *extra)
        else:
            path = two_code_recipe(
                tmp_path / f"{name}.toml",
                data={"limit": 300, "labelled": 60},
                optim={"classification": {"name": "sgd", "lr": 0.05, "momentum": 0.9}},
            )
            trainer = prepared_trainer(
                path, tmp_path / name, ["run.mixed_precision=bf16", "train.batch_size=20", *extra]
            )
        if name == "fallback":
            for opt in trainer.optimizers.values():
                opt.kernel = None
        assert (trainer.master_weights is None) == (name == "autocast")
        for _ in range(3):
            trainer.train_step(trainer.batches.take(20))
        runs[name] = trainer.model.state_dict()
    assert runs["loop"].keys() == runs["autocast"].keys()
    low = [k for k, v in runs["loop"].items() if k.endswith((".weight", ".bias"))]
    assert low and all(runs["loop"][k].dtype == torch.float32 for k in low)
    for key, value in runs["autocast"].items():
        assert torch.equal(runs["fallback"][key], value), key
        torch.testing.assert_close(runs["loop"][key], value, rtol=1e-3, atol=1e-5)


class ConvertedShapes(TorchDispatchMode):
    """Shapes of the tensors converted between dtypes (casts) by the operators that run inside it."""

    def __init__(self):
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and out.dtype != args[0].dtype:
            self.shapes.add(tuple(out.shape))
        elif func is torch.ops.aten.copy_.default and args[0].dtype != args[1].dtype:
            self.shapes.add(tuple(args[0].shape))
        return out


def test_an_engine_step_casts_no_weight(tmp_path):
    """Under plain autocast every linear weight is cast in every step; with master weights none is (the data
    and the outputs still are)."""
    converted = {}
    for name, extra in (("autocast", ["run.bf16_master_weights=false"]), ("masters", [])):
        trainer = gaussian_trainer(tmp_path / name, "run.mixed_precision=bf16", *extra)
        trainer.train_step(trainer.batches.take(20))
        with ConvertedShapes() as mode:
            trainer.train_step(trainer.batches.take(20))
        converted[name] = mode.shapes
        weights = {tuple(p.shape) for n, p in trainer.model.named_parameters() if n.endswith(".weight")}
    assert weights and weights <= converted["autocast"]
    assert not weights & converted["masters"], weights & converted["masters"]
    assert converted["masters"]  # the inputs are still cast


def test_bf16_run_resumes_bitwise_and_writes_fp32_weights(tmp_path):
    """A bf16 run killed after its step-8 checkpoint and resumed ends bit-identical to one run straight
    through (weights, optimizer state, RNG); every file holds fp32 weights; the checkpoint also resumes under
    plain autocast (same format)."""
    recipe = two_code_recipe(
        tmp_path / "r.toml",
        data={"limit": 400, "labelled": 60},
        run={"seed": 3, "mixed_precision": "bf16"},
        train={"batch_size": 20, "max_steps": 16, "log_every": 4, "checkpoint_every": 4},
    )
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    result = aaekit_process("run", str(recipe), "--output-dir", str(straight), env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fp32 masters; the optimizers update them with the compiled loops" in result.stdout
    result = aaekit_process(
        "run",
        str(recipe),
        "--output-dir",
        str(broken),
        env={"AAEKIT_TEST_SIGNAL_AT": "SIGKILL:10", **ONE_THREAD},
    )
    assert result.returncode == -9
    result = aaekit_process("run", str(recipe), "--output-dir", str(broken), "--resume", env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    final = "checkpoints/step-00000016"
    for name in ("model.safetensors", "optimizers.safetensors", "rng.safetensors", "state.json"):
        assert (straight / final / name).read_bytes() == (broken / final / name).read_bytes(), name
    weights = load_file(str(straight / "model.safetensors"))
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}
    moments = load_file(str(straight / final / "optimizers.safetensors"))
    assert {v.dtype for v in moments.values()} == {torch.float32}

    # the same checkpoint continues under plain autocast
    result = aaekit(
        "run",
        str(recipe),
        "run.bf16_master_weights=false",
        "train.max_steps=20",
        "--output-dir",
        str(straight),
        "--resume",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert metric_lines(straight)[-1]["step"] == 20


def test_without_a_compiler_bf16_trains_through_torch(tmp_path):
    recipe = two_code_recipe(
        tmp_path / "r.toml",
        data={"limit": 200},
        run={"seed": 3, "mixed_precision": "bf16"},
        train={"batch_size": 20, "max_steps": 4, "log_every": 2},
    )
    result = aaekit_process(
        "run",
        str(recipe),
        "--output-dir",
        str(tmp_path / "run"),
        env={"CC": str(tmp_path / "no-such-compiler"), **ONE_THREAD},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the optimizers update them with torch operations (compiling failed" in result.stdout, (
        result.stdout[-2000:]
    )
    assert metric_lines(tmp_path / "run")[-1]["step"] == 4


@linux_only
def test_two_ranks_in_bf16_stay_identical(tmp_path):
    """Under accelerate launch (two CPU ranks, gloo) DDP averages the bf16 gradients; each rank updates its
    own masters with the compiled loop, and both end with the same weights."""
    recipe = two_code_recipe(
        tmp_path / "r.toml",
        data={"limit": 400, "labelled": 60},
        run={"seed": 3, "mixed_precision": "bf16"},
        train={"batch_size": 20, "max_steps": 12, "log_every": 4},
    )
    dump = tmp_path / "dump"
    result = launch_two_ranks(
        "run", str(recipe), "--output-dir", str(tmp_path / "run"), env={"AAEKIT_DUMP_RANKS": str(dump)}
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "fp32 masters; the optimizers update them with the compiled loops" in result.stdout
    # encoder, decoder and the two discriminators are DDP modules, each averaging through
    # mean_gradients_in_fp32
    assert "bf16: 4 modules average the ranks' bf16 gradients in fp32" in result.stdout
    assert assert_ranks_identical(dump) > 0
    weights = load_file(str(dump / "rank0.safetensors"))
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}


RANK_MEANS = textwrap.dedent("""
    import os, torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from aaekit.cpu.master_weights import mean_gradients_in_fp32

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 64).to(torch.bfloat16)
    ddp = DistributedDataParallel(layer)
    ddp.register_comm_hook(None, mean_gradients_in_fp32)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(100 + rank)).bfloat16()
    ddp(x).float().square().sum().backward()
    own = torch.autograd.grad(layer(x).float().square().sum(), layer.weight)[0]
    every = [torch.empty_like(own) for _ in range(world)]
    dist.all_gather(every, own)
    exact = (torch.stack([g.double() for g in every]).sum(0) / world).float().bfloat16()
    in_bf16 = own / world  # what DDP's default hook does: divide, then sum in the gradients' dtype
    dist.all_reduce(in_bf16)
    if rank == 0:
        print("default", int((in_bf16 != exact).sum()), flush=True)
        print("hooked", int((layer.weight.grad != exact).sum()), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    # torch 2.13 with gloo and DDP sometimes aborts in its C++ teardown at interpreter exit ("terminate called
    # without an active exception", about 1 run in 8 on 2 busy cores) after every rank has finished: skip it.
    os._exit(0)
""")


def test_ranks_average_bf16_gradients_in_fp32(tmp_path):
    """With four gloo ranks under DDP, the hook the engine installs for bf16 weights gives each averaged
    gradient as the exact mean rounded once to bf16; DDP's default (dividing and summing in bf16) does not."""
    script = tmp_path / "rank_means.py"
    script.write_text(RANK_MEANS)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4", str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **ONE_THREAD},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    counts = dict(
        line.split() for line in result.stdout.splitlines() if line.split()[:1] in (["default"], ["hooked"])
    )
    assert int(counts["default"]) > 0, counts  # the rounding this hook exists for
    assert int(counts["hooked"]) == 0, counts


KERNEL_STATUS = (
    "from aaekit.cpu.master_weights import compiled_kernel; "
    "fn, why = compiled_kernel(); print(fn is not None, why)"
)


@linux_only
def test_a_broken_cached_build_is_rebuilt_and_an_unwritable_cache_falls_back(tmp_path):
    def status(cache) -> str:
        env = {**os.environ, "AAEKIT_CACHE_DIR": str(cache)}
        return subprocess.run(
            [sys.executable, "-c", KERNEL_STATUS], env=env, capture_output=True, text=True, check=True
        ).stdout.strip()

    assert status(tmp_path / "cache") == "True None"
    (built,) = (tmp_path / "cache" / "kernels").glob("*.so")
    built.write_bytes(built.read_bytes()[:64])  # truncated, as by a full disk
    assert status(tmp_path / "cache") == "True None"
    assert built.stat().st_size > 64
    # builds of an earlier source for this machine kind, and those named as earlier versions named them, go
    # when a new build is made; another machine kind's build in a shared cache stays
    kernels = tmp_path / "cache" / "kernels"
    _, machine, source = built.stem.split("-")
    stale = [
        kernels / f"bf16_master-{machine}-000000000000.so",
        kernels / "adam_bf16_master-0123456789abcdef.so",
        kernels / "bf16_master-0123456789abcdef.so",
    ]
    other_machine = kernels / f"bf16_master-ffffffffffff-{source}.so"
    for path in (*stale, other_machine):
        path.write_bytes(b"old")
    built.unlink()
    assert status(tmp_path / "cache") == "True None"
    assert built.exists() and other_machine.exists() and not any(p.exists() for p in stale)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert status(blocker).startswith("False compiling failed")  # the cache folder cannot be created
