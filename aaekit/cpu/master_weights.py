"""bf16 training on a CPU with fp32 master weights.

Under autocast every linear layer casts its fp32 weight to bf16 in every forward pass, and its bf16 weight
gradient back to fp32 in the backward pass. On the paper's MNIST setting that is about 3 ms of an 18 ms bf16
step on a 2-core CPU, nearly as much as Adam itself (README, benchmarks). Here the layers that autocast runs
in bf16 hold bf16 weights (autocast leaves those alone), the fp32 weights live beside them as masters, and one
compiled loop per optimizer step reads the bf16 gradients, updates the fp32 masters with Adam (or SGD) and
writes the bf16 weights, in one pass over memory. The arithmetic is autocast's: the same bf16 rounding of the
same fp32 weights, the same bf16 products, the same fp32 optimizer.

The model's ``state_dict`` returns the fp32 masters and ``load_state_dict`` fills them, so checkpoints and
``model.safetensors`` hold fp32 weights as in every other mode (a run may resume in either mode). The
optimizers' state has the layout of torch's Adam and SGD (``step``, ``exp_avg``, ``exp_avg_sq``;
``momentum_buffer``), in fp32.

The loops are C, compiled once per machine with the system's C compiler into aaekit's cache and loaded with
ctypes (no Python object is deserialised). They run on torch's OpenMP threads. Without a compiler, or without
torch's OpenMP runtime, the same update runs as torch operations (fused Adam or foreach SGD on the masters,
then a cast): the same numbers (Adam's to the last bit or so, SGD's exactly), slower.

Under DDP the ranks' bf16 gradients are averaged by ``mean_gradients_in_fp32``, a communication hook that sums
them in fp32 and rounds the mean once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.optim.adam import adam as functional_adam
from torch.optim.sgd import sgd as functional_sgd

from aaekit.contracts import cache_dir
from aaekit.cpu.runtime import openmp_runtimes

# Modules whose operators autocast runs in bf16 on a CPU (casting fp32 inputs and leaving bf16 weights alone;
# not nn.Bilinear, for example, which then fails on mixed dtypes). tests/test_master_weights.py runs each.
LOW_PRECISION_MODULES = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)

# Adam on fp32 masters from bf16 gradients, writing the bf16 weights. Bias corrections in double as torch
# does; bf16 rounding to nearest even, NaN kept NaN (torch's conversion). The inner loop has no aliasing and
# no branches, so the compiler vectorises it; it multiplies by 1/sqrt(bias correction 2) where torch divides
# (one vector division less per element: 3.4 -> 2.6 ms for the paper's 6.4 M updates a step on a 2-core Xeon,
# where torch's fused Adam on fp32 weights takes 3.2 ms; the results differ from torch's in the last bit now
# and then).
KERNEL_SOURCE = (Path(__file__).parent / "master_weights.c").read_text(encoding="utf-8")  # package data


def _cpu_signature() -> str:
    """Built with -march=native, so a build is only reused on a CPU with the same model and features (a cache
    folder shared by several machines holds one build per kind)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    model = re.search(r"^model name\s*:(.*)$", info, re.M)
    flags = re.search(r"^flags\s*:(.*)$", info, re.M)
    return f"{model.group(1) if model else ''}|{flags.group(1) if flags else ''}"


def _build(target: Path, compiler: str, flags: list[str], gomp: Path) -> str | None:
    """Compile the loop to ``target``; returns the reason where that fails. Concurrent builders (several
    ranks) each compile in a private folder and rename into place."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            source, built = Path(tmp) / "bf16_master.c", Path(tmp) / target.name
            source.write_text(KERNEL_SOURCE)
            # Linked against torch's libgomp by path: the loader then reuses the copy torch has already
            # loaded.
            cmd = [compiler, *flags, str(source), "-o", str(built), str(gomp), f"-Wl,-rpath,{gomp.parent}"]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                last = (done.stderr or done.stdout).strip().splitlines()[-1:]
                return f"compiling failed: {last[0] if last else f'exit status {done.returncode}'}"
            os.replace(built, target)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"compiling failed ({exc})"
    return None


def remove_stale_builds(kernels: Path, machine: str, keep: Path) -> None:
    """Builds of earlier sources of the loops for this machine kind, and builds named the way earlier aaekit
    versions named them, are never loaded again; builds for other machine kinds sharing the cache stay."""
    stale = [
        *kernels.glob(f"bf16_master-{machine}-*.so"),
        *kernels.glob("adam_bf16_master-*.so"),
        *kernels.glob("bf16_master-" + "?" * 16 + ".so"),
    ]
    for path in stale:
        if path != keep:
            path.unlink(missing_ok=True)  # a process that has it loaded keeps its mapping


@functools.cache
def compiled_kernel():
    """The compiled loops (a library with ``adam_bf16_master`` and ``sgd_bf16_master``) and None, or None and
    the reason there is none (not Linux, no torch OpenMP runtime, no compiler, compiling failed). Built once
    per machine kind and source into the cache; a cached build that does not load (e.g. truncated) is rebuilt
    once."""
    if not sys.platform.startswith("linux"):
        return None, "the compiled update is built on Linux only"
    # The loop links against the OpenMP runtime torch has loaded, so it shares torch's threads (no second
    # pool).
    runtimes = openmp_runtimes()
    if not runtimes:
        return None, "torch has loaded no OpenMP runtime to share threads with"
    gomp = runtimes[0]
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return None, "no C compiler found (set CC)"
    flags = [
        "-O3",
        "-march=native",
        "-fno-math-errno",
        "-ffp-contract=off",
        "-fopenmp",
        "-shared",
        "-fPIC",
        "-std=c99",
    ]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags.append("-mprefer-vector-width=512")  # full-width vectors where the CPU has AVX-512
    machine = hashlib.sha256("\n".join([compiler, *flags, str(gomp), _cpu_signature()]).encode()).hexdigest()[
        :12
    ]
    source = hashlib.sha256(KERNEL_SOURCE.encode()).hexdigest()[:12]
    kernels = cache_dir() / "kernels"
    target = kernels / f"bf16_master-{machine}-{source}.so"
    lib = None
    for attempt in range(2):
        if not target.exists():
            problem = _build(target, compiler, flags, gomp)
            if problem:
                return None, problem
            remove_stale_builds(kernels, machine, target)
        try:
            lib = ctypes.CDLL(str(target))
            break
        except OSError as exc:
            if attempt:
                return None, f"loading {target} failed ({exc})"
            target.unlink(missing_ok=True)
    pointers, numels = ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int64)
    lib.adam_bf16_master.argtypes = [
        ctypes.c_int64,
        pointers,
        pointers,
        pointers,
        pointers,
        pointers,
        numels,
        pointers,
        ctypes.c_double,
        ctypes.c_double,
        ctypes.c_double,
        ctypes.c_double,
        ctypes.c_double,
        ctypes.c_int,
    ]
    lib.sgd_bf16_master.argtypes = [
        ctypes.c_int64,
        pointers,
        pointers,
        pointers,
        pointers,
        numels,
        ctypes.POINTER(ctypes.c_int32),
        ctypes.c_double,
        ctypes.c_double,
        ctypes.c_double,
        ctypes.c_int,
    ]
    lib.adam_bf16_master.restype = lib.sgd_bf16_master.restype = None
    return lib, None


def _pointer_array(tensors: list[torch.Tensor]):
    return (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))


class MasterWeights:
    """Turns the weights of the low-precision layers of ``trained`` (modules of ``model``) into bf16 and keeps
    fp32 masters for them; ``model.state_dict()`` and ``model.load_state_dict()`` see the masters."""

    def __init__(self, model: nn.Module, trained: list[nn.Module]):
        self.master_of: dict[nn.Parameter, torch.Tensor] = {}
        for module in trained:
            for layer in module.modules():
                if isinstance(layer, LOW_PRECISION_MODULES):
                    for p in layer.parameters(recurse=False):
                        if p.dtype == torch.float32 and p not in self.master_of:
                            self.master_of[p] = p.detach().clone()
                            p.data = p.data.to(torch.bfloat16)
        self.by_name = {
            name: self.master_of[p] for name, p in model.named_parameters() if p in self.master_of
        }
        # torch marks hooks with an attribute, which bound methods do not take: plain functions are registered
        model.register_state_dict_post_hook(lambda *args: self._masters_into_state_dict(*args))
        model.register_load_state_dict_pre_hook(lambda *args: self._state_dict_into_masters(*args))

    def __len__(self) -> int:
        return len(self.master_of)

    def _masters_into_state_dict(self, module, state_dict, prefix, local_metadata):
        for name, master in self.by_name.items():
            if prefix + name in state_dict:
                state_dict[prefix + name] = master.detach()

    def _state_dict_into_masters(self, module, state_dict, prefix, *args):
        with torch.no_grad():
            for name, master in self.by_name.items():
                value = state_dict.get(prefix + name)
                if isinstance(value, torch.Tensor) and value.shape == master.shape:
                    # the bf16 weight is then filled from the same value by load_state_dict
                    master.copy_(value)


class MasterOptimizer(torch.optim.Optimizer):
    """An optimizer over a model's parameters where some are bf16 weights with fp32 masters
    (``MasterWeights``): those are updated through their masters, the rest as plain fp32 parameters. Several
    optimizers may share one ``MasterWeights`` (the encoder is updated by three phases). Its state has the
    layout of the torch optimizer it stands for, in fp32. Subclasses give the update as torch operations
    (``torch_update``); ``fast_update`` may take the bf16 weights in one pass instead."""

    def __init__(self, params, masters: MasterWeights, defaults: dict, kernel_name: str):
        super().__init__(params, defaults)
        self.masters = masters
        library = compiled_kernel()[0]
        self.kernel = getattr(library, kernel_name) if library is not None else None
        # The loop's pointer arrays for everything but the gradients, per set of parameters that had gradients
        # (rebuilt after load_state_dict replaces the state tensors).
        self._pointers: dict[tuple[int, ...], tuple] = {}

    def cached_pointers(self, low: list, build) -> tuple:
        key = tuple(map(id, low))
        pointers = self._pointers.get(key)
        if pointers is None:
            pointers = self._pointers[key] = build()
        return pointers

    @staticmethod
    def gradient_pointers(low: list):
        return _pointer_array([p.grad if p.grad.is_contiguous() else p.grad.contiguous() for p in low])

    def torch_update(self, group: dict, params: list, grads: list, owners: list) -> None:
        raise NotImplementedError

    def fast_update(self, group: dict, low: list) -> bool:
        """Update the bf16 weights ``low`` and their masters in one pass; False where it cannot."""
        return False

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            low, full = [], []
            for p in group["params"]:
                if p.grad is not None:
                    (low if p in self.masters.master_of else full).append(p)
            if full:
                self.torch_update(group, full, [p.grad for p in full], full)
            if low and not self.fast_update(group, low):
                masters = [self.masters.master_of[p] for p in low]
                self.torch_update(group, masters, [p.grad.float() for p in low], low)
                torch._foreach_copy_(low, masters)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's zero_grad, without its profiler span and per-call checks (called three times a training
        step)."""
        if not set_to_none:
            return super().zero_grad(set_to_none=False)
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts loaded state to each parameter's dtype, which would round the fp32 state of bf16
        weights to bf16; it is put back in fp32 from the saved values."""
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        for saved_id, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.detach().to(torch.float32, copy=True)
        self._pointers.clear()


class MasterAdam(MasterOptimizer):
    """Adam (AdamW with ``decoupled=True``): bf16 weights through the compiled loop where it is built, else
    (and fp32 parameters always) torch's fused Adam."""

    def __init__(
        self,
        params,
        masters: MasterWeights,
        lr: float,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled: bool = False,
    ):
        super().__init__(
            params,
            masters,
            {
                "lr": lr,
                "betas": tuple(betas),
                "eps": eps,
                "weight_decay": weight_decay,
                "decoupled": decoupled,
            },
            "adam_bf16_master",
        )

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32)
        return state

    def torch_update(self, group: dict, params: list, grads: list, owners: list) -> None:
        states = [self._state(p) for p in owners]
        beta1, beta2 = group["betas"]
        functional_adam(
            params,
            grads,
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            [s["step"] for s in states],
            fused=True,
            decoupled_weight_decay=group["decoupled"],
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )

    def fast_update(self, group: dict, low: list) -> bool:
        if self.kernel is None:
            return False

        def build():
            states = [self._state(p) for p in low]
            return (
                _pointer_array([self.masters.master_of[p] for p in low]),
                _pointer_array([s["exp_avg"] for s in states]),
                _pointer_array([s["exp_avg_sq"] for s in states]),
                _pointer_array(low),
                (ctypes.c_int64 * len(low))(*(p.numel() for p in low)),
                _pointer_array([s["step"] for s in states]),
            )

        masters, exp_avgs, exp_avg_sqs, weights, numels, steps = self.cached_pointers(low, build)
        beta1, beta2 = group["betas"]
        self.kernel(
            len(low),
            masters,
            exp_avgs,
            exp_avg_sqs,
            self.gradient_pointers(low),
            weights,
            numels,
            steps,
            group["lr"],
            beta1,
            beta2,
            group["eps"],
            group["weight_decay"],
            int(group["decoupled"]),
        )
        return True


class MasterSGD(MasterOptimizer):
    """SGD with momentum (the semi-supervised recipes' classification phase): bf16 weights through the
    compiled loop where it is built, else (and fp32 parameters always) torch's foreach SGD; the same numbers
    either way."""

    def __init__(
        self,
        params,
        masters: MasterWeights,
        lr: float,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ):
        super().__init__(
            params,
            masters,
            {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay},
            "sgd_bf16_master",
        )

    def fast_update(self, group: dict, low: list) -> bool:
        if self.kernel is None:
            return False
        states = [self.state[p] for p in low]
        first = [0] * len(low)
        if group["momentum"]:
            for i, (p, state) in enumerate(zip(low, states)):
                if "momentum_buffer" not in state:  # torch creates it on the first step, from the gradient
                    state["momentum_buffer"] = torch.empty(p.shape, dtype=torch.float32)
                    first[i] = 1

        def build():
            masters = [self.masters.master_of[p] for p in low]
            # unused without
            buffers = [s["momentum_buffer"] for s in states] if group["momentum"] else masters
            return (
                _pointer_array(masters),
                _pointer_array(buffers),
                _pointer_array(low),
                (ctypes.c_int64 * len(low))(*(p.numel() for p in low)),
            )

        if any(first):  # new buffers: new pointers
            self._pointers.pop(tuple(map(id, low)), None)
        masters_p, buffers, weights, numels = self.cached_pointers(low, build)
        self.kernel(
            len(low),
            masters_p,
            buffers,
            self.gradient_pointers(low),
            weights,
            numels,
            (ctypes.c_int32 * len(low))(*first),
            group["lr"],
            group["momentum"],
            group["weight_decay"],
            int(group["nesterov"]),
        )
        return True

    def torch_update(self, group: dict, params: list, grads: list, owners: list) -> None:
        states = [self.state[p] for p in owners]
        buffers = [s.get("momentum_buffer") for s in states]
        functional_sgd(
            params,
            grads,
            buffers,
            foreach=True,
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=0.0,
            nesterov=group["nesterov"],
            maximize=False,
        )
        if group["momentum"]:
            for state, buffer in zip(states, buffers):  # created on the first step
                state["momentum_buffer"] = buffer


def mean_gradients_in_fp32(process_group, bucket):
    """DDP communication hook for bf16 weights: the ranks' bf16 gradients are summed in fp32 (exact for bf16
    values of any ordinary spread), divided once and rounded to bf16 once. DDP's own hook divides and sums in
    the gradients' dtype, which with three or more ranks rounds every partial sum: measured with four gloo
    ranks, 31 % of a layer's averaged gradients off by at least one bf16 step. fp32 buckets are averaged as
    DDP does."""
    import torch.distributed as dist

    group = process_group if process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    buffer = bucket.buffer()
    if buffer.dtype == torch.float32:
        buffer.div_(world)
        return dist.all_reduce(buffer, group=group, async_op=True).get_future().then(lambda f: f.value()[0])
    wide = buffer.float()

    def round_back(future):
        buffer.copy_(future.value()[0].div_(world))
        return buffer

    return dist.all_reduce(wide, group=group, async_op=True).get_future().then(round_back)
