"""The engine: the paper's alternating schedule on Accelerate.

Every mini-batch:
  1. reconstruction phase  - encoder + decoder (and heads) minimise reconstruction error;
  2. regularization phase  - for each code: discriminator step (prior samples real, codes fake),
                             then one generator step for the encoder over all codes;
  3. classification phase  - where a head has a labelled loss: encoder on a labelled mini-batch.
Each phase does its own forward pass through the prepared (DDP-wrapped) modules, so gradients are
averaged across ranks in every phase. The engine knows no concrete prior, posterior, dataset or head.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType

from aaekit import checkpoint as ckpt
from aaekit.cpu import keep_freed_memory, set_flush_denormals
from aaekit.data import ShuffledBatches, balanced_subset, hold, labelled_count, split_off
from aaekit.errors import TrainingStopped, UserError
from aaekit.master_weights import MasterAdam, MasterSGD, MasterWeights, compiled_kernel, mean_gradients_in_fp32
from aaekit.model import AAE, build_model, check_component_outputs
from aaekit.recipe import Recipe, dataset_params

# Recipe keys that may change when a run is resumed: extending it, checkpointing differently, or a CPU setting.
RESUMABLE_CHANGES = {"train.epochs", "train.max_steps", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.log_every", "train.pictures", "train.imbalance_warning_steps", "run.flush_denormals",
                     "run.bf16_master_weights", "run.threads"}


def make_optimizer(settings: dict, params: list[torch.nn.Parameter], device: torch.device,
                   masters: MasterWeights | None = None) -> torch.optim.Optimizer:
    kind = settings["name"]
    if masters is not None and kind == "sgd":  # bf16 weights with fp32 masters (bf16 on a CPU)
        return MasterSGD(params, masters, lr=settings["lr"], momentum=settings["momentum"],
                         nesterov=settings["nesterov"], weight_decay=settings["weight_decay"])
    if masters is not None:
        return MasterAdam(params, masters, lr=settings["lr"], betas=tuple(settings["betas"][:2]),
                          weight_decay=settings["weight_decay"], decoupled=kind == "adamw")
    if kind == "sgd":
        return torch.optim.SGD(params, lr=settings["lr"], momentum=settings["momentum"],
                               nesterov=settings["nesterov"], weight_decay=settings["weight_decay"], foreach=True)
    cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
    # fused kernels do the whole update in one pass; foreach where fused is unavailable
    fused = device.type in ("cuda", "cpu")
    return cls(params, lr=settings["lr"], betas=tuple(settings["betas"][:2]), weight_decay=settings["weight_decay"],
               fused=fused, foreach=None if fused else True)


def hot_path(optimizer, acc: Accelerator):
    """The optimizer to call every step. Accelerate's wrapper probes the installed packages on each step()
    (importlib, ~0.1 ms a call) and inspects zero_grad's signature on each zero_grad(); without a gradient
    scaler (fp16), XLA or gradient accumulation it then only forwards to the optimizer it wraps, so that one is
    called directly. Measured on the paper's MNIST setting: about 1 ms of a 25 ms bf16 step."""
    direct = (getattr(optimizer, "scaler", None) is None and acc.distributed_type != DistributedType.XLA
              and acc.gradient_accumulation_steps == 1)
    return optimizer.optimizer if direct and hasattr(optimizer, "optimizer") else optimizer


def uses_master_weights(values: dict, device: torch.device) -> bool:
    """bf16 on a CPU holds bf16 weights with fp32 masters (aaekit/master_weights.py) unless the recipe turns it off."""
    run = values["run"]
    return device.type == "cpu" and run["mixed_precision"] == "bf16" and run["bf16_master_weights"]


def refuse_lonely_process(num_processes: int) -> None:
    """Launched as several processes (WORLD_SIZE > 1) that Accelerate does not join: each would train alone."""
    world_env = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_env > 1 and num_processes == 1:
        raise UserError(
            f"WORLD_SIZE={world_env} but Accelerate sees a single process, so each process would train "
            "alone. On CPU use: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N "
            "--num_machines 1 -m aaekit run ...; on GPUs: accelerate launch --multi_gpu ..."
        )


def component_sources(values: dict, registry) -> dict:
    """Which plugin (distribution, version) provided each component the recipe names, by recipe key."""
    named = {"data": ("dataset", values["data"]["name"]), "encoder": ("posterior", values["encoder"]["name"]),
             **{f"codes.{c}.prior": ("prior", code["prior"]["name"]) for c, code in values["codes"].items()},
             **{f"heads.{k}": ("head", h["name"]) for k, h in values["heads"].items()}}
    out = {}
    for key, (kind, name) in named.items():
        entry = registry.get(kind, name)
        out[key] = {"kind": kind, "name": name, "plugin": entry.plugin, "distribution": entry.distribution,
                    "version": entry.version}
    return out


# Losses warned about: this many times the first logged value (and at least this large), or past ABSURD_LOSS
# (squared errors of values near 1e10: no data set's scale, but a bf16/fp32 run on its way to inf).
GROWTH_WARNING = 1e4
ABSURD_LOSS = 1e20


def lr_scale(epoch: int, milestones: list[int], gamma: float) -> float:
    """The paper's step schedule: multiply by gamma at each milestone epoch (0-based epochs)."""
    return gamma ** sum(1 for m in milestones if epoch >= m)


class Trainer:
    def __init__(self, recipe: Recipe, run_dir: Path, registry, *, log_with: str | None = None,
                 accelerator: Accelerator | None = None):
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.registry = registry
        values = recipe.values
        self.train_cfg = values["train"]
        self.seed = values["run"]["seed"]

        dataset_entry = registry.get("dataset", values["data"]["name"])
        has_classification = any(
            registry.get("head", h["name"]).cls.defines_classification_loss()
            for h in values["heads"].values()
        )
        # Phases that use only part of the encoder (a classification step ignores z) need DDP to
        # look for unused parameters; single-code models skip that cost.
        partial_phases = has_classification or len(values["codes"]) > 1
        self.accelerator = accelerator or Accelerator(
            mixed_precision=values["run"]["mixed_precision"],
            log_with=log_with,
            project_dir=str(self.run_dir),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=partial_phases)],
        )
        acc = self.accelerator
        refuse_lonely_process(acc.num_processes)
        batch = self.train_cfg["batch_size"]
        if batch % acc.num_processes:
            raise UserError(f"{recipe.path}: train.batch_size: {batch} does not split over "
                            f"{acc.num_processes} processes; use a multiple of {acc.num_processes}")
        self.local_batch = batch // acc.num_processes
        self.device = acc.device
        if self.device.type == "cpu":
            keep_freed_memory()
            set_flush_denormals(values["run"]["flush_denormals"])
            if values["run"]["threads"]:
                torch.set_num_threads(values["run"]["threads"])
            acc.print(f"cpu: {torch.get_num_threads()} thread(s) per process (run.threads or OMP_NUM_THREADS sets "
                      "it; while other work keeps the cores busy, fewer threads are often much faster)")

        # ---- data: held on the device, split and labelled reproducibly from the run seed ----
        torch.manual_seed(self.seed)
        dataset = dataset_entry.cls(**dataset_params(values["data"]))
        self.dataset = dataset
        full_train = dataset.load("train")
        if values["data"]["validation"] >= len(full_train):
            raise UserError(f"{recipe.path}: data.validation: {values['data']['validation']} held out of a training "
                            f"split of {len(full_train)} leaves nothing to train on; lower it")
        example_size = math.prod(full_train.x.shape[1:])
        if example_size != math.prod(dataset.input_shape):
            entry = dataset_entry
            raise UserError(f"data.name: dataset {entry.name!r} from plugin {entry.plugin} ({entry.distribution}) "
                            f"loaded examples of {example_size} values but declares input_shape "
                            f"{tuple(dataset.input_shape)}; fix the plugin")
        train, validation = split_off(full_train, values["data"]["validation"], self.seed + 1)
        self.num_classes = dataset.num_classes
        in_memory = values["data"]["in_memory"]
        self.train_data = hold(train, self.device, in_memory, acc.print)
        self.validation_data = (hold(validation, self.device, in_memory, acc.print, "validation split")
                                if len(validation) else None)
        n_train = len(self.train_data)
        if n_train < batch:
            raise UserError(f"{recipe.path}: train.batch_size: {batch} is larger than the training set ({n_train})")
        self.steps_per_epoch = n_train // batch
        n_labelled = labelled_count(values["data"]["labelled"], n_train) if self.num_classes else 0
        self.labelled_mask = torch.zeros(n_train, dtype=torch.bool)
        if n_labelled >= n_train:
            self.labelled_index = torch.arange(n_train)
        elif n_labelled > 0:
            self.labelled_index = balanced_subset(train.y, n_labelled, self.num_classes, self.seed + 2)
        else:
            self.labelled_index = torch.arange(0)
        self.labelled_mask[self.labelled_index] = True
        self.labelled_mask = self.labelled_mask.to(self.device)
        if has_classification and len(self.labelled_index) == 0:
            raise UserError(f"{recipe.path}: data.labelled: a classification head needs labelled examples")

        # ---- model, one optimizer per phase (and per discriminator), all through prepare ----
        self.model: AAE = build_model(recipe, registry, dataset.input_shape, self.num_classes)
        # What the model was built from, kept in the run folder: a dataset may set its shape per instance (from
        # its files), so loading the run must not depend on the dataset again.
        self.model_record = {
            "input_shape": list(dataset.input_shape), "num_classes": self.num_classes,
            "value_range": [float(v) if math.isfinite(v) else None
                            for v in getattr(dataset, "value_range", dataset_entry.cls.value_range)],
            "plugins_dirs": [str(Path(d).resolve()) for d in getattr(registry, "plugin_dirs", [])],
            "components": component_sources(values, registry),
        }
        m = self.model
        trainable_heads = {k: h for k, h in m.heads.items() if any(p.requires_grad for p in h.parameters())}
        self.classifying_heads = {k: h for k, h in m.heads.items() if h.has_classification_loss}
        optim = values["optim"]
        self.master_weights = None
        if uses_master_weights(values, self.device):
            self.master_weights = MasterWeights(m, [m.encoder, m.decoder, *m.discriminators.values(),
                                                    *trainable_heads.values()])
        masters = self.master_weights
        self.opt_reconstruction = make_optimizer(
            optim["reconstruction"],
            [*m.encoder.parameters(), *m.decoder.parameters(), *(p for h in trainable_heads.values() for p in h.parameters())],
            self.device, masters)
        self.opt_discriminators = {
            c: make_optimizer({**optim["discriminator"], "lr": self.base_lr(f"discriminator.{c}")},
                              list(d.parameters()), self.device, masters)
            for c, d in m.discriminators.items()}
        self.opt_generator = make_optimizer(optim["generator"], list(m.encoder.parameters()), self.device, masters)
        self.opt_classification = (
            make_optimizer(optim["classification"], list(m.encoder.parameters()), self.device, masters)
            if self.classifying_heads else None
        )
        if masters is not None:
            missing = compiled_kernel()[1]
            acc.print(f"bf16: {len(masters)} weight tensors held in bf16 with fp32 masters; the optimizers update "
                      + (f"them with torch operations ({missing})" if missing else "them with the compiled loops"))
        self.optimizers = {"reconstruction": self.opt_reconstruction, "generator": self.opt_generator,
                           **{f"discriminator.{c}": o for c, o in self.opt_discriminators.items()}}
        if self.opt_classification is not None:
            self.optimizers["classification"] = self.opt_classification

        self.start = {"step": 0, "epoch": 0}
        self._resume_checkpoint = None
        self._last_good = None  # the newest checkpoint written or resumed from, named when a run stops
        # Test-only fault injection (tests/test_distributed.py): AAEKIT_TEST_RAISE_AT="RANK:STEP" makes
        # that rank raise before that step, to prove the other ranks do not hang.
        fault = os.environ.get("AAEKIT_TEST_RAISE_AT", "")
        self._raise_at = tuple(int(v) for v in fault.split(":")) if fault else None
        # AAEKIT_TEST_SIGNAL_AT="SIGNAL:STEP" (e.g. "SIGINT:26"): the process sends itself that real signal as that
        # step begins, so kill and Ctrl-C tests do not race a run that may finish before a watcher reacts.
        signal_name, _, signal_step = os.environ.get("AAEKIT_TEST_SIGNAL_AT", "").partition(":")
        self._signal_at = (getattr(signal, signal_name), int(signal_step)) if signal_name else None

    # ------------------------------------------------------------------------------------------------
    def prepare(self, checkpoint: ckpt.Checkpoint | None) -> None:
        acc, m = self.accelerator, self.model
        if checkpoint is not None:
            missing = set(m.state_dict()) ^ set(checkpoint.model)
            if missing:
                raise UserError(f"{checkpoint.path}: model weights do not match this recipe "
                                f"(differing keys: {sorted(missing)[:5]}...)")
            m.load_state_dict(checkpoint.model)
        probe = self.train_data.inputs(torch.arange(min(4, len(self.train_data))).to(self.device))
        check_component_outputs(m, probe, self.model_record["components"], acc.autocast)
        disc_names = list(m.discriminators)
        head_names = [k for k, h in m.heads.items() if any(p.requires_grad for p in h.parameters())]
        opt_names = list(self.optimizers)
        prepared = acc.prepare(m.encoder, m.decoder, *(m.discriminators[c] for c in disc_names),
                               *(m.heads[k] for k in head_names), *(self.optimizers[o] for o in opt_names))
        self.encoder, self.decoder = prepared[0], prepared[1]
        self.discriminators = dict(zip(disc_names, prepared[2:2 + len(disc_names)]))
        rest = prepared[2 + len(disc_names):]
        self.heads = {k: h for k, h in m.heads.items()}
        self.heads.update(dict(zip(head_names, rest[:len(head_names)])))
        if self.master_weights is not None:  # bf16 gradients: the ranks' mean is taken in fp32 and rounded once
            wrapped = [d for d in prepared[:2 + len(disc_names) + len(head_names)]
                       if isinstance(d, torch.nn.parallel.DistributedDataParallel)]
            for module in wrapped:
                module.register_comm_hook(None, mean_gradients_in_fp32)
            if wrapped:
                acc.print(f"bf16: {len(wrapped)} modules average the ranks' bf16 gradients in fp32")
        self.optimizers = {name: hot_path(opt, acc) for name, opt in zip(opt_names, rest[len(head_names):])}
        self.opt_reconstruction = self.optimizers["reconstruction"]
        self.opt_generator = self.optimizers["generator"]
        self.opt_discriminators = {c: self.optimizers[f"discriminator.{c}"] for c in disc_names}
        self.opt_classification = self.optimizers.get("classification")

        # Generators: batch order is shared by all ranks (each takes its slice); noise differs per rank.
        self.batches = ShuffledBatches(len(self.train_data), self.seed)
        self.labelled_batches = (ShuffledBatches(len(self.labelled_index), self.seed + 3)
                                 if len(self.labelled_index) else None)
        self.noise = torch.Generator(device=self.device).manual_seed(self.seed * 1000 + 7 + acc.process_index)
        self.imbalance = {c: 0 for c in m.discriminators}
        self.warned_imbalance: set[str] = set()
        self.first_losses: dict[str, float] = {}
        self.growth_warnings: dict[str, str] = {}
        if checkpoint is not None:
            self._restore(checkpoint)

    # ------------------------------------------------------------------------------------------------
    # The three phases of the paper's schedule.

    def encode(self, x: torch.Tensor) -> dict:
        noise_std = self.recipe.values["encoder"]["input_noise"]
        if noise_std > 0:  # §5: Gaussian noise on the encoder input
            x = x + noise_std * torch.randn(x.shape, generator=self.noise, device=x.device)
        return self.encoder(x, generator=self.noise)

    def reconstruction_loss(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.recipe.values["decoder"]["loss"] == "bce":
            return F.binary_cross_entropy_with_logits(logits, x)
        return F.mse_loss(self.model.to_data_space(logits), x)

    def reconstruction_phase(self, x: torch.Tensor, labels: torch.Tensor) -> dict:
        """Update encoder + decoder to reconstruct x (and heads, with their penalties)."""
        self.opt_reconstruction.zero_grad(set_to_none=True)
        codes = self.encode(x)
        logits = self.decoder(self.model.decoder_input(codes, labels, self.heads))
        loss = self.reconstruction_loss(logits, x)
        out = {"loss/reconstruction": loss.detach()}
        for key, head in self.model.heads.items():
            penalty = head.reconstruction_penalty()
            if penalty is not None:
                out[f"loss/penalty.{key}"] = penalty.detach()
                loss = loss + penalty
        self.accelerator.backward(loss)
        self.opt_reconstruction.step()
        return out

    def prior_samples(self, code: str, disc_labels: torch.Tensor) -> torch.Tensor:
        """Samples of the code's prior; with labels, labelled rows come from their own component."""
        prior = self.model.priors[code]
        n = disc_labels.shape[0]
        components = None
        if prior.num_components:
            components = torch.randint(prior.num_components, (n,), generator=self.noise, device=self.device)
            if self.model.label_conditioned.get(code):
                components = torch.where(disc_labels >= 0, disc_labels, components)
        return prior.sample(n, components, generator=self.noise, device=self.device)

    def discriminate(self, name: str, discriminator, values: torch.Tensor, disc_labels: torch.Tensor) -> torch.Tensor:
        """The discriminator's logits for code values (prior samples or codes); instance noise first, where set."""
        std = self.recipe.codes[name]["discriminator"]["input_noise"]
        if std > 0:  # blurs both sides alike, so exact prior samples (one-hots) cannot be told from codes by form alone
            values = values + std * torch.randn(values.shape, generator=self.noise, device=values.device,
                                                dtype=values.dtype)
        return discriminator(self.model.discriminator_input(name, values, disc_labels)).float().flatten()

    def regularization_phase(self, x: torch.Tensor, disc_labels: torch.Tensor) -> dict:
        """For each code: a discriminator step; then one generator step for the encoder over all codes."""
        m, out = self.model, {}
        codes = self.encode(x)  # the encoder is not changed by discriminator steps, so one forward serves both
        for name, discriminator in self.discriminators.items():
            opt = self.opt_discriminators[name]
            opt.zero_grad(set_to_none=True)
            real, fake = self.prior_samples(name, disc_labels), codes[name].detach()
            # one call for both sides
            logits = self.discriminate(name, discriminator, torch.cat([real, fake.to(real.dtype)]),
                                       torch.cat([disc_labels, disc_labels]))
            n = real.shape[0]
            target = torch.cat([torch.ones(n, device=self.device), torch.zeros(n, device=self.device)])
            loss = F.binary_cross_entropy_with_logits(logits, target)
            self.accelerator.backward(loss)
            opt.step()
            with torch.no_grad():
                out[f"loss/discriminator.{name}"] = loss.detach()
                out[f"accuracy/prior.{name}"] = (logits[:n] > 0).float().mean()
                out[f"accuracy/code.{name}"] = (logits[n:] < 0).float().mean()

        self.opt_generator.zero_grad(set_to_none=True)
        g_loss = 0.0
        with self.frozen_discriminators():
            for name in self.discriminators:
                # The raw module: its weights are not updated here, so no gradient sync is needed for them.
                logits = self.discriminate(name, m.discriminators[name], codes[name], disc_labels)
                loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
                out[f"loss/generator.{name}"] = loss.detach()
                g_loss = g_loss + self.recipe.codes[name]["discriminator"]["weight"] * loss
        self.accelerator.backward(g_loss)
        self.opt_generator.step()
        return out

    def classification_phase(self) -> dict:
        """Semi-supervised phase: the heads' loss on a labelled mini-batch updates the encoder only."""
        index = self.rank_slice(self.labelled_batches.take(self.train_cfg["batch_size"]))
        index = self.labelled_index[index].to(self.device)
        x, labels = self.train_data.inputs(index), self.train_data.y[index]
        self.opt_classification.zero_grad(set_to_none=True)
        codes = self.encode(x)
        loss = sum(head.classification_loss(codes, labels) for head in self.classifying_heads.values())
        self.accelerator.backward(loss)
        self.opt_classification.step()
        return {"loss/classification": loss.detach()}

    @contextmanager
    def frozen_discriminators(self):
        """No weight gradients for discriminators during the generator step (they would be discarded)."""
        params = [p for d in self.model.discriminators.values() for p in d.parameters()]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)

    def rank_slice(self, global_index: torch.Tensor) -> torch.Tensor:
        b, r = global_index.shape[0] // self.accelerator.num_processes, self.accelerator.process_index
        return global_index[r * b:(r + 1) * b]

    def train_step(self, index: torch.Tensor) -> dict:
        x = self.train_data.inputs(index)
        labels = self.train_data.y[index]
        disc_labels = torch.where(self.labelled_mask[index], labels, torch.full_like(labels, -1))
        metrics = self.reconstruction_phase(x, labels)
        metrics.update(self.regularization_phase(x, disc_labels))
        if self.opt_classification is not None:
            metrics.update(self.classification_phase())
        return metrics

    # ------------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to the recipe's end; returns the last logged metrics."""
        acc, cfg = self.accelerator, self.train_cfg
        total_steps = cfg["epochs"] * self.steps_per_epoch
        if cfg["max_steps"]:
            total_steps = min(total_steps, cfg["max_steps"])
        step, epoch = self.start["step"], self.start["epoch"]
        step_in_epoch = step - epoch * self.steps_per_epoch
        sums: dict[str, torch.Tensor] = {}
        window_steps, window_start = 0, time.perf_counter()
        last: dict = {}
        from aaekit.progress import Progress  # rich, kept out of import time of the CLI

        progress = Progress(total_steps, step, enabled=acc.is_main_process)
        # Ctrl-C (SIGINT) and a scheduler's SIGTERM (preemption, time limit) only ask to stop: training goes on to
        # the next log step (a step boundary where the ranks synchronise anyway), so the checkpoint holds whole
        # steps and whole metric windows and resuming stays exact. The same signal again stops at once (the last
        # periodic checkpoint remains).
        interrupt = {"requested": None, "at_boundary": False}

        def on_stop_signal(signum, frame):
            if interrupt["requested"] is not None:
                raise KeyboardInterrupt
            interrupt["requested"] = signum
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            acc.print(f"{name}: going on to the next log step, then writing a checkpoint "
                      f"({name} again to stop at once)", flush=True)

        stop_signals = (signal.SIGINT, signal.SIGTERM)
        previous_handlers = ({s: signal.signal(s, on_stop_signal) for s in stop_signals}
                             if threading.current_thread() is threading.main_thread() else {})
        try:
            with progress:
                while step < total_steps:
                    if step_in_epoch == 0:
                        self.set_epoch_lr(epoch)
                        if step > 0 or self.batches.position > 0:
                            self.batches.start_pass()  # drop the remainder of the last pass
                    if self._raise_at == (acc.process_index, step):
                        raise RuntimeError(f"AAEKIT_TEST_RAISE_AT: rank {acc.process_index} fails at step {step}")
                    if self._signal_at is not None and self._signal_at[1] == step:
                        os.kill(os.getpid(), self._signal_at[0])
                    index = self.rank_slice(self.batches.take(cfg["batch_size"])).to(self.device)
                    for k, v in self.train_step(index).items():
                        sums[k] = sums[k] + v if k in sums else v.clone()
                    step, step_in_epoch, window_steps = step + 1, step_in_epoch + 1, window_steps + 1
                    epoch_done = step_in_epoch == self.steps_per_epoch
                    if epoch_done:
                        epoch, step_in_epoch = epoch + 1, 0
                    at_end = step == total_steps
                    ckpt_due = cfg["checkpoint_every"] and step % cfg["checkpoint_every"] == 0
                    logged = step % cfg["log_every"] == 0 or epoch_done or at_end or ckpt_due
                    if logged:
                        elapsed = time.perf_counter() - window_start
                        last = self.log(sums, window_steps, elapsed, step, epoch, epoch_done)
                        progress.update(step, epoch, last)
                        sums, window_steps, window_start = {}, 0, time.perf_counter()
                    if ckpt_due and not at_end:
                        self.save_checkpoint_or_stop(step, epoch)
                    if logged and not at_end and self.interrupt_agreed(interrupt["requested"] is not None):
                        interrupt["at_boundary"] = True
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            if not interrupt["at_boundary"]:
                raise  # stopped mid-step: no checkpoint of a half-done step
            self.save_checkpoint_or_stop(step, epoch)
            signum = interrupt["requested"] or signal.SIGINT  # a rank that got no signal stops with its peers
            raise TrainingStopped(
                f"interrupted at step {step} ({signal.Signals(signum).name}); checkpoint written to "
                f"{self.run_dir / 'checkpoints'}; continue with: aaekit run {self.run_dir / 'recipe.toml'} "
                f"--resume --output-dir {self.run_dir}", exit_code=128 + int(signum)) from None
        finally:
            for s, handler in previous_handlers.items():
                signal.signal(s, handler)
        self.save_checkpoint_or_stop(step, epoch)
        self.finish(last)
        return last

    def interrupt_agreed(self, requested: bool) -> bool:
        """Whether any rank was asked to stop: ranks must stop at the same step (the checkpoint is a collective)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return requested
        votes = acc.reduce(torch.tensor([float(requested)], device=self.device), reduction="sum")
        return bool(votes.item() > 0)

    def set_epoch_lr(self, epoch: int) -> None:
        scale = lr_scale(epoch, self.train_cfg["lr_milestones"], self.train_cfg["lr_gamma"])
        for name, opt in self.optimizers.items():
            for group in opt.param_groups:
                group["lr"] = self.base_lr(name) * scale

    def base_lr(self, optimizer_name: str) -> float:
        """The recipe's rate for an optimizer ("generator", "discriminator.y", ...), with the code's lr_scale."""
        phase, _, code = optimizer_name.partition(".")
        lr = self.recipe.values["optim"][phase]["lr"]
        return lr * self.recipe.codes[code]["discriminator"]["lr_scale"] if code else lr

    # ------------------------------------------------------------------------------------------------
    def log(self, sums: dict, steps: int, elapsed: float, step: int, epoch: int, epoch_done: bool) -> dict:
        """One host sync per log line: means over the window, averaged across ranks."""
        acc = self.accelerator
        names = sorted(sums)
        means = torch.stack([sums[k].float() for k in names]) / max(steps, 1)
        means = acc.reduce(means, reduction="mean") if acc.num_processes > 1 else means
        values = dict(zip(names, means.tolist()))
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            good = self._last_good or "none yet"
            raise TrainingStopped(
                f"loss diverged (non-finite {', '.join(bad)}) by step {step}; stopped. The last good checkpoint "
                f"is kept: {good}. Lower the learning rates in [optim.*] or use run.mixed_precision = \"no\".",
                exit_code=3)
        record = {"step": step, "epoch": epoch, **values,
                  "samples_per_s": steps * self.train_cfg["batch_size"] / max(elapsed, 1e-9),
                  "lr/reconstruction": self.opt_reconstruction.param_groups[0]["lr"]}
        if epoch_done:
            record.update(self.evaluate_epoch())
        self.check_imbalance(values, steps)
        self.check_growth(values, step)
        if acc.is_main_process:
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        if self.accelerator.trackers:
            acc.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
        return record

    def check_imbalance(self, values: dict, steps: int) -> None:
        """Warn once per code when one side of its discriminator wins for a long stretch: the discriminator right
        on 90 % of prior samples and codes together (a gmm_label run whose codes never reached the prior sat at
        94-96 % from step 300 on; healthy runs stay near 60-75 %), or codes passing for prior samples 99 % of
        the time."""
        limit = self.train_cfg["imbalance_warning_steps"]
        for code in self.imbalance:
            prior_acc, code_acc = values.get(f"accuracy/prior.{code}"), values.get(f"accuracy/code.{code}")
            if prior_acc is None:
                continue
            d_wins = (prior_acc + code_acc) / 2 >= 0.9
            g_wins = code_acc < 0.01
            self.imbalance[code] = self.imbalance[code] + steps if (d_wins or g_wins) else 0
            if limit and self.imbalance[code] >= limit and code not in self.warned_imbalance:
                self.warned_imbalance.add(code)
                side = "discriminator" if d_wins else "encoder (generator)"
                self.accelerator.print(
                    f"warning: for code {code!r} the {side} has been winning for {self.imbalance[code]} steps; "
                    "the codes are probably not matching the prior. Balance the learning rates of "
                    "[optim.discriminator] and [optim.generator] (or the discriminator's size).")

    def check_growth(self, values: dict, step: int) -> None:
        """Warn once per loss that grows far past where it started (a run heading for divergence in bf16 reaches
        1e30 before it reaches inf); the warning is repeated when the run ends, so an exit 0 does not hide it."""
        for key, value in values.items():
            if not key.startswith("loss/"):
                continue
            first = self.first_losses.setdefault(key, abs(value))
            huge = abs(value) > GROWTH_WARNING * max(first, 1.0) or abs(value) > ABSURD_LOSS
            if huge and key not in self.growth_warnings:
                self.growth_warnings[key] = (
                    f"{key} reached {value:.3g} by step {step} (first logged: {first:.3g}); the run is probably "
                    "diverging: lower the learning rates in [optim.*] and check the data's scale")
                self.accelerator.print(f"warning: {self.growth_warnings[key]}")

    @torch.no_grad()
    def share_buffers(self) -> None:
        """Give every rank rank 0's buffers (batch-norm running statistics). Each rank updates them from its own
        slice of the batch, so without this the ranks would evaluate and save different models. (SyncBatchNorm
        would keep them equal, but torch runs it on GPUs only.)"""
        if self.accelerator.num_processes > 1:
            for buffer in self.model.buffers():
                torch.distributed.broadcast(buffer, src=0)

    @torch.no_grad()
    def evaluate_epoch(self) -> dict:
        """Per-epoch metrics on the held-out validation split (if any), gathered over all ranks."""
        if self.validation_data is None:
            return {}
        self.share_buffers()
        from aaekit.evaluate import evaluate_split

        return {f"validation/{k}": v for k, v in
                evaluate_split(self.model, self.validation_data, self.accelerator).items()}

    # ------------------------------------------------------------------------------------------------
    def rng_tensors(self) -> dict[str, torch.Tensor]:
        """Every rank's noise generator state (gathered to all), plus the shared batch streams."""
        acc = self.accelerator
        noise = self.noise.get_state()
        if acc.num_processes > 1:
            gathered = acc.gather(noise.to(self.device).to(torch.int32).unsqueeze(0))
            noise_states = {f"noise.rank{r}": gathered[r].cpu().to(torch.uint8) for r in range(acc.num_processes)}
        else:
            noise_states = {"noise.rank0": noise}
        data_info, data_state = self.batches.state()
        tensors = {**noise_states, "batches": data_state}
        info = {"batches": data_info}
        if self.labelled_batches is not None:
            info["labelled_batches"], tensors["labelled_batches"] = self.labelled_batches.state()
        return tensors, info

    def save_checkpoint(self, step: int, epoch: int) -> None:
        acc = self.accelerator
        self.share_buffers()  # collective, like rng_tensors: the final save and finish() see the same model
        rng, info = self.rng_tensors()  # collective: every rank takes part
        if acc.is_main_process:
            opt_tensors: dict[str, torch.Tensor] = {}
            opt_meta = {name: ckpt.optimizer_to_files(name, opt.state_dict(), opt_tensors)
                        for name, opt in self.optimizers.items()}
            scaler = acc.scaler.state_dict() if acc.scaler is not None else None
            state = {"step": step, "epoch": epoch, "world_size": acc.num_processes, "streams": info,
                     "optimizers": opt_meta, "scaler": scaler, "imbalance": self.imbalance}
            path = ckpt.write_checkpoint(self.run_dir / "checkpoints", step, self.model.state_dict(),
                                         opt_tensors, rng, state, keep=self.train_cfg["keep_checkpoints"])
            self._last_good = str(path)
        acc.wait_for_everyone()

    def save_checkpoint_or_stop(self, step: int, epoch: int) -> None:
        """A checkpoint that cannot be written (disk full, folder removed) stops the run by name: training on
        without one would risk more than it could lose."""
        try:
            self.save_checkpoint(step, epoch)
        except OSError as exc:
            raise TrainingStopped(f"cannot write the checkpoint of step {step} under {self.run_dir / 'checkpoints'} "
                                  f"({exc.strerror or exc}); stopped. The last good checkpoint is kept: "
                                  f"{self._last_good or 'none yet'}. Free space or fix the folder, then resume.",
                                  exit_code=4) from None

    def _restore(self, checkpoint: ckpt.Checkpoint) -> None:
        acc, state = self.accelerator, checkpoint.state
        if state.get("world_size", 1) != acc.num_processes:
            acc.print(f"note: checkpoint was written by {state.get('world_size')} processes, resuming on "
                      f"{acc.num_processes}; the noise streams restart per rank")
        for name, opt in self.optimizers.items():
            if name not in state["optimizers"]:
                raise UserError(f"{checkpoint.path}: no optimizer state for phase {name!r}; the recipe changed")
            opt.load_state_dict(ckpt.optimizer_from_files(name, state["optimizers"][name], checkpoint.optimizers))
        if state.get("scaler") and acc.scaler is not None:
            acc.scaler.load_state_dict(state["scaler"])
        key = f"noise.rank{acc.process_index}"
        if key in checkpoint.rng:
            self.noise.set_state(checkpoint.rng[key])
        self.batches.restore(state["streams"]["batches"], checkpoint.rng["batches"])
        if self.labelled_batches is not None and "labelled_batches" in checkpoint.rng:
            self.labelled_batches.restore(state["streams"]["labelled_batches"], checkpoint.rng["labelled_batches"])
        self.imbalance.update(state.get("imbalance", {}))
        self.start = {"step": int(state["step"]), "epoch": int(state["epoch"])}
        self._last_good = str(checkpoint.path)

    def finish(self, last: dict) -> None:
        acc = self.accelerator
        for warning in self.growth_warnings.values():
            acc.print(f"warning: {warning}")
        if acc.is_main_process:
            ckpt.save_tensors(self.model.state_dict(), self.run_dir / "model.safetensors")
            if self.train_cfg["pictures"]:
                from aaekit.pictures import write_pictures

                write_pictures(self, self.run_dir)
        # Debug hook: AAEKIT_DUMP_RANKS=DIR makes every rank save its own weights to DIR/rank{r}.safetensors,
        # so tests can show that data-parallel ranks end identical.
        dump = os.environ.get("AAEKIT_DUMP_RANKS")
        if dump:
            Path(dump).mkdir(parents=True, exist_ok=True)
            ckpt.save_tensors(self.model.state_dict(), Path(dump) / f"rank{acc.process_index}.safetensors")
        acc.wait_for_everyone()



def run_training(recipe: Recipe, run_dir: Path, registry, *, resume: bool = False, log_with: str | None = None) -> dict:
    """Train a recipe into ``run_dir`` (created by the caller); resume from its latest checkpoint if asked."""
    threads = torch.get_num_threads()
    try:
        return _run_training(recipe, run_dir, registry, resume=resume, log_with=log_with)
    finally:
        torch.set_num_threads(threads)  # run.threads applies to the run, not to a caller in the same process


def _run_training(recipe: Recipe, run_dir: Path, registry, *, resume: bool, log_with: str | None) -> dict:
    try:
        trainer = Trainer(recipe, run_dir, registry, log_with=log_with)
    except BaseException as exc:  # building the model or holding the data can ask for more than there is
        if is_out_of_memory(exc):
            raise UserError(out_of_memory_message(exc, recipe)) from None
        raise
    acc = trainer.accelerator
    checkpoint = None
    try:
        if resume:
            checkpoint = ckpt.latest_checkpoint(run_dir / "checkpoints", warn=acc.print)
            if checkpoint is None:
                acc.print(f"note: no checkpoint in {run_dir / 'checkpoints'}; starting from step 0")
        trainer.prepare(checkpoint)
        if acc.is_main_process:  # training starts now: only from here is the folder a run
            from aaekit.rundir import trim_metrics, write_run_record

            write_run_record(run_dir, recipe, trainer.model_record)
            replaced = trim_metrics(run_dir, trainer.start["step"]) if resume else 0
            if replaced:
                acc.print(f"note: {replaced} metric line(s) past step {trainer.start['step']} are trained again; "
                          "they were moved to metrics.replaced.jsonl")
        acc.wait_for_everyone()
        if log_with:
            acc.init_trackers(recipe.values["run"]["name"], config=_flat(recipe.values))
        result = trainer.fit()
    except TrainingStopped:
        release_ranks(acc)  # every rank stops alike: divergence and Ctrl-C are agreed on at log steps
        raise
    except UserError:
        raise
    except BaseException as exc:
        if is_out_of_memory(exc) and acc.num_processes == 1:
            raise UserError(out_of_memory_message(exc, recipe)) from None
        if acc.num_processes > 1:
            # The other ranks may be waiting in a collective this one will never join. Leaving at once (no
            # barrier, no atexit teardown) lets the launcher see the failure and stop them, instead of a hang.
            print(f"rank {acc.process_index}: training failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(1)
        raise
    finally:
        if log_with:
            acc.end_training()
    release_ranks(acc)
    return result


def is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text))


def out_of_memory_message(exc: BaseException, recipe: Recipe) -> str:
    """Name what asked for the memory: the allocation that failed, and the sizes of the recipe that drive it."""
    values = recipe.values
    wanted = next((part.strip() for part in str(exc).replace(";", ".").split(". ") if "allocate" in part),
                  "an allocation failed")
    discs = ", ".join(f"codes.{c}.discriminator.hidden = {code['discriminator']['hidden']}"
                      for c, code in values["codes"].items())
    return (f"{recipe.path}: out of memory ({wanted}) with train.batch_size = {values['train']['batch_size']}, "
            f"encoder.hidden = {values['encoder']['hidden']}, decoder.hidden = {values['decoder']['hidden']}, "
            f"{discs}, data.in_memory = {values['data']['in_memory']!r}; lower these sizes (or set "
            "data.in_memory = false to stream the data)")


def release_ranks(acc: Accelerator) -> None:
    """DDP processes can abort at exit unless models are released first. Only then: free_memory runs a
    full gc.collect, seconds on a large heap, for nothing in a single process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        acc.free_memory()
        acc.wait_for_everyone()


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out
