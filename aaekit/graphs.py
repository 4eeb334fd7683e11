"""The training step replayed as one CUDA graph (recipe key ``run.cuda_graphs``).

On a GPU the paper's step is a few hundred small kernels, each launched from Python, so launch time rather
than arithmetic bounds it. A CUDA graph records the kernels of one whole step (all three phases, their
backward passes and optimizer updates, in the schedule's order) and replays them with a single launch.
The step's code is the eager one; what makes it replayable is arranged around it: the batch's row numbers
are copied into fixed buffers, the noise generator is registered with the graph, the optimizers keep their
step counts on the device (``capturable``), and a new learning rate, recorded in the graph as a number,
means recording again.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from aaekit.errors import UserError

CHOICES = ("off", "on", "auto")


def graphs_problem(device: torch.device, num_processes: int, data_on_device: bool) -> str | None:
    """Why the step cannot be replayed as a CUDA graph here, or None when it can."""
    if device.type != "cuda":
        return f"they need a CUDA device and this run is on {device.type}"
    if num_processes > 1:
        return "several processes synchronise gradients with DDP, which this capture does not cover"
    if not data_on_device:
        return "the training split is streamed from host memory (data.in_memory), not held on the GPU"
    return None


def use_graphs(setting: str, problem: str | None, recipe_path, log) -> bool:
    """Resolve ``run.cuda_graphs``: "on" where it cannot run is an error, "auto" says why it is off."""
    if setting == "off":
        return False
    if problem is None:
        return True
    if setting == "on":
        raise UserError(
            f'{recipe_path}: run.cuda_graphs: "on" cannot be kept: {problem}; '
            'use "auto" (on where possible) or "off"'
        )
    log(f"cuda graphs: off ({problem})")
    return False


class GraphedStep:
    """Calls ``step(*inputs)`` eagerly for ``warmup`` steps (lazy state: optimizer moments, library
    handles), then records it once and replays the recording for every later call.

    The inputs are tensors of fixed shape (or None, always in the same places); the returned tensors are
    the recording's own outputs, overwritten by the next call, so a caller keeps copies (sums) only.
    Where recording fails (a plugin that reads a value back to the host mid-step, say), ``strict`` raises a
    UserError naming the reason; otherwise the step says so once and runs eagerly from then on.
    """

    def __init__(
        self,
        step: Callable[..., dict],
        generators: list[torch.Generator],
        *,
        strict: bool,
        log=print,
        warmup: int = 3,
    ):
        self.step, self.generators, self.strict, self.log, self.warmup = step, generators, strict, log, warmup
        self.failed: str | None = None
        self.recordings = 0  # how many times the step was recorded (once, plus once per change of rate)
        self.replays = self.calls = 0
        self.reset()

    def reset(self) -> None:
        """Drop the recording (the rates it holds are stale): the next calls warm up and record again."""
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple = ()
        self.outputs: dict = {}
        self.eager_calls = 0

    @property
    def replaying(self) -> bool:
        return self.graph is not None

    def summary(self) -> str:
        done = f"replayed for {self.replays} of {self.calls} steps"
        if self.failed is not None:
            return f"cuda graphs: recording failed ({self.failed}); {done}"
        return f"cuda graphs: the step was recorded {self.recordings} time(s) and {done}"

    def __call__(self, *inputs) -> dict:
        self.calls += 1
        if self.failed is not None:
            return self.step(*inputs)
        if self.graph is None:
            if self.eager_calls < self.warmup:
                self.eager_calls += 1
                return self._on_side_stream(inputs)
            if not self._record(inputs):
                return self.step(*inputs)
        for buffer, value in zip(self.inputs, inputs):
            if buffer is not None:
                buffer.copy_(value, non_blocking=True)
        self.graph.replay()
        self.replays += 1
        return self.outputs

    def _on_side_stream(self, inputs: tuple) -> dict:
        # warm-up off the default stream, as recording will be: lazily made state then lives where the
        # recording expects it
        side, main = torch.cuda.Stream(), torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            out = self.step(*inputs)
        main.wait_stream(side)
        return out

    def _record(self, inputs: tuple) -> bool:
        graph = torch.cuda.CUDAGraph()
        for generator in self.generators:
            graph.register_generator_state(generator)
        static = tuple(None if x is None else x.clone() for x in inputs)
        try:
            with torch.cuda.graph(graph):
                outputs = self.step(*static)
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if self.strict:
                raise UserError(
                    f'run.cuda_graphs: "on", but the training step could not be recorded as a CUDA graph '
                    f'({reason}); use "off" (or "auto", which falls back to eager steps)'
                ) from None
            self.failed = reason
            self.log(f"cuda graphs: recording the step failed ({reason}); eager steps from here on")
            return False
        self.graph, self.inputs, self.outputs = graph, static, outputs
        self.recordings += 1
        return True
