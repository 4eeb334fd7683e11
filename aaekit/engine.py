"""The engine: the paper's alternating schedule on Accelerate.

Every mini-batch (``Trainer.train_step``):
  1. reconstruction phase  - encoder + decoder (and heads) minimise reconstruction error;
  2. regularization phase  - for each code: discriminator step (prior samples real, codes fake),
                             then one generator step for the encoder over all codes;
  3. classification phase  - where a head has a labelled loss: encoder on a labelled mini-batch.
Each phase does its own forward pass through the prepared (DDP-wrapped) modules, so gradients are averaged
across ranks in every phase. The engine knows no concrete prior, posterior, dataset or head. Around it:
optimizers in :mod:`aaekit.optim`, checkpoints in :mod:`aaekit.checkpoint`, stop requests in
:mod:`aaekit.stopping`, warnings in :mod:`aaekit.monitor`, test-only switches in :mod:`aaekit.switches`.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import AutocastKwargs, DistributedDataParallelKwargs

from aaekit import checkpoint as ckpt
from aaekit.cpu import keep_freed_memory, set_flush_denormals, slow_bf16_reason
from aaekit.cpu.master_weights import MasterWeights, compiled_kernel, mean_gradients_in_fp32
from aaekit.data import DeviceData, ShuffledBatches, training_splits
from aaekit.errors import TrainingStopped, UserError
from aaekit.graphs import GraphedStep, graphs_problem, use_graphs
from aaekit.model import AAE, build_model, check_component_outputs
from aaekit.monitor import Monitor
from aaekit.optim import base_lr, hot_path, lr_scale, phase_optimizers, uses_master_weights
from aaekit.recipe import Recipe, dataset_params
from aaekit.runs import model_record, refuse_lonely_process
from aaekit.stopping import StopAtOnce, StopRequests
from aaekit.switches import TestSwitches

# Recipe keys that may change when a run is resumed: extending it, checkpointing differently, or a CPU
# setting.
RESUMABLE_CHANGES = {
    "train.epochs",
    "train.max_steps",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.log_every",
    "train.pictures",
    "train.imbalance_warning_steps",
    "run.flush_denormals",
    "run.bf16_master_weights",
    "run.threads",
    "run.cuda_graphs",
}


@dataclass(frozen=True)
class StepSettings:
    """What the phases read from the recipe, resolved once."""

    batch_size: int
    input_noise: float  # §5: Gaussian noise on the encoder input
    bce: bool  # reconstruction loss: binary cross-entropy on logits, else squared error in data space
    instance_noise: dict[str, float]  # per code: noise on everything its discriminator sees
    generator_weight: dict[str, float]  # per code: weight of its generator loss

    @classmethod
    def of(cls, values: dict) -> StepSettings:
        codes = values["codes"]
        return cls(
            values["train"]["batch_size"],
            values["encoder"]["input_noise"],
            values["decoder"]["loss"] == "bce",
            {c: code["discriminator"]["input_noise"] for c, code in codes.items()},
            {c: code["discriminator"]["weight"] for c, code in codes.items()},
        )


class Trainer:
    def __init__(
        self,
        recipe: Recipe,
        run_dir: Path,
        registry,
        *,
        log_with: str | None = None,
        accelerator: Accelerator | None = None,
    ):
        self.recipe, self.run_dir, self.registry = recipe, Path(run_dir), registry
        values = recipe.values
        self.train_cfg, self.seed = values["train"], values["run"]["seed"]
        self.settings = StepSettings.of(values)
        self._setup_accelerator(accelerator, log_with)
        self._setup_data()
        self._setup_model()
        self._setup_optimizers()
        self.monitor = Monitor(
            self.model.discriminators, self.train_cfg["imbalance_warning_steps"], self.accelerator.print
        )
        self.switches = TestSwitches.from_env()
        self.start = {"step": 0, "epoch": 0}
        self._last_good = None  # the newest checkpoint written or resumed from, named when a run stops

    # ---- the three phases of the paper's schedule
    # --------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> dict:
        if self.settings.input_noise > 0:
            x = x + self.settings.input_noise * torch.randn(x.shape, generator=self.noise, device=x.device)
        return self.encoder(x, generator=self.noise)

    def reconstruction_phase(self, x: torch.Tensor, labels: torch.Tensor) -> dict:
        """Update encoder + decoder to reconstruct x (and heads, with their penalties)."""
        self.opt_reconstruction.zero_grad(set_to_none=True)
        codes = self.encode(x)
        logits = self.decoder(self.model.decoder_input(codes, labels, self.heads)).float()
        loss = (
            F.binary_cross_entropy_with_logits(logits, x)
            if self.settings.bce
            else F.mse_loss(self.model.to_data_space(logits), x)
        )
        out = {"loss/reconstruction": loss.detach()}
        for key, head in self.model.heads.items():
            on_batch = head.encoder_penalty(x, codes, self.encode, self.noise)
            penalties = [p for p in (head.reconstruction_penalty(), on_batch) if p is not None]
            if penalties:
                penalty = sum(penalties)
                out[f"loss/penalty.{key}"] = penalty.detach()
                loss = loss + penalty
        self.accelerator.backward(loss)
        self.opt_reconstruction.step()
        return out

    def regularization_phase(self, x: torch.Tensor, disc_labels: torch.Tensor) -> dict:
        """For each code: a discriminator step; then one generator step for the encoder over all codes."""
        out = {}
        # the encoder is not changed by discriminator steps, so one forward serves both
        codes = self.encode(x)
        for name, discriminator in self.discriminators.items():
            opt = self.opt_discriminators[name]
            opt.zero_grad(set_to_none=True)
            real, fake = self.prior_samples(name, disc_labels), codes[name].detach()
            logits = self.discriminate(
                name,
                discriminator,
                torch.cat([real, fake.to(real.dtype)]),
                torch.cat([disc_labels, disc_labels]),
            )  # one call for both sides
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
                logits = self.discriminate(name, self.model.discriminators[name], codes[name], disc_labels)
                loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
                out[f"loss/generator.{name}"] = loss.detach()
                g_loss = g_loss + self.settings.generator_weight[name] * loss
        self.accelerator.backward(g_loss)
        self.opt_generator.step()
        return out

    def classification_phase(self, index: torch.Tensor | None = None) -> dict:
        """Semi-supervised phase: the heads' loss on a labelled mini-batch (rows of the training split; the
        next of the labelled stream if None) updates the encoder only."""
        index = self.next_labelled() if index is None else index
        x, labels = self.train_data.inputs(index), self.train_data.y[index]
        self.opt_classification.zero_grad(set_to_none=True)
        codes = self.encode(x)
        loss = sum(head.classification_loss(codes, labels) for head in self.classifying_heads.values())
        self.accelerator.backward(loss)
        self.opt_classification.step()
        return {"loss/classification": loss.detach()}

    def train_step(self, index: torch.Tensor, labelled: torch.Tensor | None = None) -> dict:
        """One step of the schedule on the rows ``index`` of the training split (and ``labelled`` for the
        classification phase). Host work stays outside, so the step can be replayed as a CUDA graph."""
        x, labels = self.train_data.inputs(index), self.train_data.y[index]
        disc_labels = torch.where(self.labelled_mask[index], labels, torch.full_like(labels, -1))
        metrics = self.reconstruction_phase(x, labels)
        metrics.update(self.regularization_phase(x, disc_labels))
        if self.opt_classification is not None:
            metrics.update(self.classification_phase(labelled))
        return metrics

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's rows of the next mini-batch, and of the next labelled one where a head classifies."""
        index = self.to_device(self.rank_slice(self.batches.take(self.settings.batch_size)))
        return index, self.next_labelled() if self.opt_classification is not None else None

    def next_labelled(self) -> torch.Tensor:
        index = self.rank_slice(self.labelled_batches.take(self.settings.batch_size))
        return self.to_device(self.labelled_index[index])

    def to_device(self, index: torch.Tensor) -> torch.Tensor:
        # through pinned memory the copy to a GPU is queued, not waited for: no host sync per step
        if self.device.type == "cuda":
            return index.pin_memory().to(self.device, non_blocking=True)
        return index.to(self.device)

    # ---- what the phases share
    # -------------------------------------------------------------------------------
    def prior_samples(self, code: str, disc_labels: torch.Tensor) -> torch.Tensor:
        """Samples of the code's prior; with labels, labelled rows come from their own component."""
        prior, n = self.model.priors[code], disc_labels.shape[0]
        components = None
        if prior.num_components:
            components = torch.randint(prior.num_components, (n,), generator=self.noise, device=self.device)
            if self.model.label_conditioned.get(code):
                components = torch.where(disc_labels >= 0, disc_labels, components)
        return prior.sample(n, components, generator=self.noise, device=self.device)

    def discriminate(
        self, name: str, discriminator, values: torch.Tensor, disc_labels: torch.Tensor
    ) -> torch.Tensor:
        """The discriminator's logits for code values (prior samples or codes); instance noise first, where
        set."""
        std = self.settings.instance_noise[name]
        # blurs both sides alike, so exact prior samples (one-hots) cannot be told from codes by form alone
        if std > 0:
            values = values + std * torch.randn(
                values.shape, generator=self.noise, device=values.device, dtype=values.dtype
            )
        return discriminator(self.model.discriminator_input(name, values, disc_labels)).float().flatten()

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
        return global_index[r * b : (r + 1) * b]

    # ---- the loop
    # ----------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to the recipe's end; returns the last logged metrics."""
        from aaekit.progress import Progress  # rich, kept out of the CLI's import time

        acc, cfg = self.accelerator, self.train_cfg
        total_steps = cfg["epochs"] * self.steps_per_epoch
        if cfg["max_steps"]:
            total_steps = min(total_steps, cfg["max_steps"])
        step, epoch = self.start["step"], self.start["epoch"]
        step_in_epoch = step - epoch * self.steps_per_epoch
        sums: dict[str, torch.Tensor] = {}
        window_steps, window_start, last = 0, time.perf_counter(), {}
        stop = StopRequests(acc.print)
        try:
            with stop, Progress(total_steps, step, enabled=acc.is_main_process) as progress:
                while step < total_steps:
                    if step_in_epoch == 0:
                        self.set_epoch_lr(epoch)
                        if step > 0 or self.batches.position > 0:
                            self.batches.start_pass()  # drop the remainder of the last pass
                    self.switches.before_step(acc.process_index, step)
                    for k, v in self.step(*self.next_batch()).items():
                        sums[k] = sums[k] + v if k in sums else v.clone()
                    step, step_in_epoch, window_steps = step + 1, step_in_epoch + 1, window_steps + 1
                    epoch_done = step_in_epoch == self.steps_per_epoch
                    if epoch_done:
                        epoch, step_in_epoch = epoch + 1, 0
                    at_end = step == total_steps
                    checkpoint_due = cfg["checkpoint_every"] and step % cfg["checkpoint_every"] == 0
                    if step % cfg["log_every"] == 0 or epoch_done or at_end or checkpoint_due:
                        last = self.log(
                            sums, window_steps, time.perf_counter() - window_start, step, epoch, epoch_done
                        )
                        progress.update(step, epoch, last)
                        sums, window_steps, window_start = {}, 0, time.perf_counter()
                        if not at_end and self.stop_agreed(stop.requested is not None):
                            self.save_checkpoint(step, epoch)  # at a log step: whole windows, an exact resume
                            raise stop.stopped(step, self.run_dir)
                    if checkpoint_due and not at_end:
                        self.save_checkpoint(step, epoch)
        except StopAtOnce as exc:  # a second request: mid-step, so the last checkpoint is what remains
            raise stop.stopped_at_once(exc.signum, step, self._last_good, self.run_dir) from None
        self.save_checkpoint(step, epoch)
        self.finish()
        return last

    def stop_agreed(self, requested: bool) -> bool:
        """Whether any rank was asked to stop: ranks must stop at the same step (the checkpoint is a
        collective)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return requested
        votes = acc.reduce(torch.tensor([float(requested)], device=self.device), reduction="sum")
        return bool(votes.item() > 0)

    def set_epoch_lr(self, epoch: int) -> None:
        scale = lr_scale(epoch, self.train_cfg["lr_milestones"], self.train_cfg["lr_gamma"])
        changed = False
        for name, opt in self.optimizers.items():
            for group in opt.param_groups:
                lr = base_lr(self.recipe.values, name) * scale
                if group["lr"] != lr:
                    group["lr"], changed = lr, True
        if changed and isinstance(self.step, GraphedStep):
            self.step.reset()  # the recording holds the old rates

    def log(self, sums: dict, steps: int, elapsed: float, step: int, epoch: int, epoch_done: bool) -> dict:
        """One host sync per log line: means over the window, averaged across ranks."""
        acc = self.accelerator
        names = sorted(sums)
        means = torch.stack([sums[k].float() for k in names]) / max(steps, 1)
        values = dict(
            zip(names, (acc.reduce(means, reduction="mean") if acc.num_processes > 1 else means).tolist())
        )
        self.monitor.check(values, steps, step, self._last_good)
        record = {
            "step": step,
            "epoch": epoch,
            **values,
            "samples_per_s": steps * self.train_cfg["batch_size"] / max(elapsed, 1e-9),
            "lr/reconstruction": self.opt_reconstruction.param_groups[0]["lr"],
        }
        if epoch_done:
            record.update(self.evaluate_epoch())
        metrics, line = self.run_dir / "metrics.jsonl", json.dumps(record)
        what = f"the metrics of step {step} into {metrics}"
        self.write_on_rank0(what, lambda: ckpt.append_line(metrics, line))
        if acc.trackers:
            acc.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
        return record

    @torch.no_grad()
    def evaluate_epoch(self) -> dict:
        """Per-epoch metrics on the held-out validation split (if any), gathered over all ranks."""
        if self.validation_data is None:
            return {}
        self.share_buffers()
        from aaekit.evaluation.validation import evaluate_split

        return {
            f"validation/{k}": v
            for k, v in evaluate_split(self.model, self.validation_data, self.accelerator).items()
        }

    @torch.no_grad()
    def share_buffers(self) -> None:
        """Give every rank rank 0's buffers (batch-norm running statistics). Each rank updates them from its
        own slice of the batch, so without this the ranks would evaluate and save different models.
        (SyncBatchNorm would keep them equal, but torch runs it on GPUs only.)"""
        if self.accelerator.num_processes > 1:
            for buffer in self.model.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def save_checkpoint(self, step: int, epoch: int) -> None:
        """A checkpoint (collective); one that cannot be written (disk full, folder removed) stops the run."""
        self.share_buffers()  # the final save and finish() see the same model on every rank
        try:
            path = ckpt.save_training(self, step, epoch)
        except OSError as exc:
            folder = self.run_dir / "checkpoints"
            raise self.write_stopped(exc, f"the checkpoint of step {step} under {folder}") from None
        self._last_good = str(path)

    def write_on_rank0(self, what: str, write) -> None:
        """Call ``write`` on rank 0 (collective); a write that fails stops every rank (see write_stopped)."""
        failure = None
        if self.accelerator.is_main_process:
            try:
                write()
            except OSError as exc:
                failure = exc
        try:
            ckpt.raise_on_every_rank(self.accelerator, failure)
        except OSError as exc:
            raise self.write_stopped(exc, what) from None

    def write_stopped(self, exc: OSError, what: str) -> TrainingStopped:
        """The stop (exit 4) for a file rank 0 could not write: training on without it would risk more than
        it could lose; the last good checkpoint is where to resume from."""
        return TrainingStopped(
            f"cannot write {what} ({exc.strerror or exc}); stopped. The last good checkpoint is kept: "
            f"{self._last_good or 'none yet'}. Free space or fix the folder, then rerun the same command "
            "with --resume.",
            exit_code=4,
        )

    def finish(self) -> None:
        acc = self.accelerator
        self.monitor.repeat_warnings()
        if isinstance(self.step, GraphedStep):
            acc.print(self.step.summary())
        # the final checkpoint holds the trained weights: resuming writes them if this fails
        self.write_on_rank0(f"the trained model or its pictures into {self.run_dir}", self.write_results)
        self.switches.after_finish(self.model.state_dict(), acc.process_index)
        acc.wait_for_everyone()

    def write_results(self) -> None:
        ckpt.save_tensors(self.model.state_dict(), self.run_dir / "model.safetensors")
        if self.train_cfg["pictures"]:
            from aaekit.pictures import write_pictures

            write_pictures(self, self.run_dir)

    # ---- set-up, by concern
    # ----------------------------------------------------------------------------------
    def _setup_accelerator(self, accelerator: Accelerator | None, log_with: str | None) -> None:
        values = self.recipe.values
        classifying = any(
            self.registry.get("head", h["name"]).cls.defines_classification_loss()
            for h in values["heads"].values()
        )
        # Phases that use only part of the encoder (a classification step ignores z) need DDP to look for
        # unused parameters; single-code models skip that cost.
        partial_phases = classifying or len(values["codes"]) > 1
        handlers = [DistributedDataParallelKwargs(find_unused_parameters=partial_phases)]
        if values["run"]["cuda_graphs"] != "off" and torch.cuda.is_available():
            # autocast's cache of cast weights would hold tensors made inside a recording
            handlers.append(AutocastKwargs(cache_enabled=False))
        self.accelerator = acc = accelerator or Accelerator(
            mixed_precision=values["run"]["mixed_precision"],
            log_with=log_with,
            project_dir=str(self.run_dir),
            kwargs_handlers=handlers,
        )
        refuse_lonely_process(acc.num_processes)
        batch = self.settings.batch_size
        if batch % acc.num_processes:
            raise UserError(
                f"{self.recipe.path}: train.batch_size: {batch} does not split over "
                f"{acc.num_processes} processes; use a multiple of {acc.num_processes}"
            )
        self.device = acc.device
        if self.device.type == "cpu" and values["run"]["mixed_precision"] == "fp16":
            # Accelerate would train in fp32 without a word; fp16's gradient scaler is for GPUs
            raise UserError(
                f'{self.recipe.path}: run.mixed_precision: "fp16" needs a GPU and this run is on the CPU; '
                'use "bf16" (fast on CPUs) or "no"'
            )
        if self.device.type == "cpu":
            keep_freed_memory()
            set_flush_denormals(values["run"]["flush_denormals"])
            if values["run"]["threads"]:
                torch.set_num_threads(values["run"]["threads"])
            acc.print(
                f"cpu: {torch.get_num_threads()} thread(s) per process (run.threads or OMP_NUM_THREADS sets "
                "it; while other work keeps the cores busy, fewer threads are often much faster)"
            )
            slow = slow_bf16_reason() if values["run"]["mixed_precision"] == "bf16" else None
            if slow:
                acc.print(
                    f'warning: run.mixed_precision = "bf16" is slow here ({slow}): bf16 trains several '
                    "times slower than fp32 on such a CPU; "
                    'run.mixed_precision = "no" is faster on this machine'
                )

    def _setup_data(self) -> None:
        """The dataset, checked against the shape it declares, and its splits drawn from the run seed."""
        values = self.recipe.values
        torch.manual_seed(self.seed)
        self.dataset_entry = e = self.registry.get("dataset", values["data"]["name"])
        self.dataset = dataset = e.cls(**dataset_params(values["data"]))
        full_train = dataset.load("train")
        example_size = math.prod(full_train.x.shape[1:])
        if example_size != math.prod(dataset.input_shape):
            raise UserError(
                f"data.name: dataset {e.name!r} from plugin {e.plugin} ({e.distribution}) loaded "
                f"examples of {example_size} values but declares input_shape "
                f"{tuple(dataset.input_shape)}; fix the plugin"
            )
        self.num_classes = dataset.num_classes
        splits = training_splits(
            full_train,
            values["data"],
            self.settings.batch_size,
            self.num_classes,
            self.seed,
            self.device,
            self.recipe.path,
            self.accelerator.print,
        )
        self.train_data, self.validation_data = splits.train, splits.validation
        self.labelled_index, self.labelled_mask = splits.labelled_index, splits.labelled_mask
        self.steps_per_epoch = splits.steps_per_epoch

    def _setup_model(self) -> None:
        values = self.recipe.values
        self.model: AAE = build_model(self.recipe, self.registry, self.dataset.input_shape, self.num_classes)
        m = self.model
        self.trainable_heads = {
            k: h for k, h in m.heads.items() if any(p.requires_grad for p in h.parameters())
        }
        self.classifying_heads = {k: h for k, h in m.heads.items() if h.has_classification_loss}
        if self.classifying_heads and len(self.labelled_index) == 0:
            raise UserError(
                f"{self.recipe.path}: data.labelled: a classification head needs labelled examples"
            )
        self.model_record = model_record(values, self.registry, self.dataset, self.dataset_entry)
        self.master_weights = None
        if uses_master_weights(values, self.device):
            self.master_weights = MasterWeights(
                m, [m.encoder, m.decoder, *m.discriminators.values(), *self.trainable_heads.values()]
            )

    def _setup_optimizers(self) -> None:
        masters, acc = self.master_weights, self.accelerator
        problem = graphs_problem(self.device, acc.num_processes, isinstance(self.train_data, DeviceData))
        self.graphed = use_graphs(
            self.recipe.values["run"]["cuda_graphs"], problem, self.recipe.path, acc.print
        )
        self.optimizers = phase_optimizers(
            self.recipe.values,
            self.model,
            self.trainable_heads,
            bool(self.classifying_heads),
            self.device,
            masters,
            capturable=self.graphed,
        )
        if masters is not None:
            missing = compiled_kernel()[1]
            self.accelerator.print(
                f"bf16: {len(masters)} weight tensors held in bf16 with fp32 masters; the optimizers update "
                + (f"them with torch operations ({missing})" if missing else "them with the compiled loops")
            )

    def prepare(self, checkpoint: ckpt.Checkpoint | None) -> None:
        """Check the components, wrap everything with Accelerate, seed the streams, and restore a
        checkpoint."""
        acc, m = self.accelerator, self.model
        if checkpoint is not None:
            missing = set(m.state_dict()) ^ set(checkpoint.model)
            if missing:
                raise UserError(
                    f"{checkpoint.path}: model weights do not match this recipe "
                    f"(differing keys: {sorted(missing)[:5]}...)"
                )
            m.load_state_dict(checkpoint.model)
        probe = self.train_data.inputs(torch.arange(min(4, len(self.train_data))).to(self.device))
        check_component_outputs(m, probe, self.model_record["components"], acc.autocast)
        if self.device.type == "cuda" and acc.num_processes > 1:
            # batch statistics over the whole global batch, as on one GPU; the layers keep their parameters
            # and buffers, so the optimizers built above still hold the right tensors
            torch.nn.SyncBatchNorm.convert_sync_batchnorm(m)
            synced = sum(isinstance(x, torch.nn.SyncBatchNorm) for x in m.modules())
            if synced:
                acc.print(f"batch norm: {synced} layer(s) synchronised across the ranks (SyncBatchNorm)")
        codes, heads, opt_names = list(m.discriminators), list(self.trainable_heads), list(self.optimizers)
        modules = [m.encoder, m.decoder, *(m.discriminators[c] for c in codes), *(m.heads[k] for k in heads)]
        prepared = acc.prepare(*modules, *(self.optimizers[o] for o in opt_names))
        wrapped, optimizers = prepared[: len(modules)], prepared[len(modules) :]
        self.encoder, self.decoder = wrapped[0], wrapped[1]
        self.discriminators = dict(zip(codes, wrapped[2 : 2 + len(codes)]))
        self.heads = {**m.heads, **dict(zip(heads, wrapped[2 + len(codes) :]))}
        # bf16 gradients: the ranks' mean is taken in fp32 and rounded once
        if self.master_weights is not None:
            ddp = [w for w in wrapped if isinstance(w, torch.nn.parallel.DistributedDataParallel)]
            for module in ddp:
                module.register_comm_hook(None, mean_gradients_in_fp32)
            if ddp:
                acc.print(f"bf16: {len(ddp)} modules average the ranks' bf16 gradients in fp32")
        self.optimizers = {name: hot_path(opt, acc) for name, opt in zip(opt_names, optimizers)}
        self.opt_reconstruction, self.opt_generator = (
            self.optimizers["reconstruction"],
            self.optimizers["generator"],
        )
        self.opt_discriminators = {c: self.optimizers[f"discriminator.{c}"] for c in codes}
        self.opt_classification = self.optimizers.get("classification")
        # Batch order is shared by all ranks (each takes its slice); noise differs per rank.
        self.batches = ShuffledBatches(len(self.train_data), self.seed)
        self.labelled_batches = (
            ShuffledBatches(len(self.labelled_index), self.seed + 3) if len(self.labelled_index) else None
        )
        self.noise = torch.Generator(device=self.device).manual_seed(self.seed * 1000 + 7 + acc.process_index)
        self.step = self.train_step
        if self.graphed:
            strict = self.recipe.values["run"]["cuda_graphs"] == "on"
            self.step = GraphedStep(self.train_step, [self.noise], strict=strict, log=acc.print)
            acc.print("cuda graphs: the training step is recorded after 3 eager steps and replayed")
        if checkpoint is not None:
            self.start = ckpt.restore_training(self, checkpoint)
            self._last_good = str(checkpoint.path)
