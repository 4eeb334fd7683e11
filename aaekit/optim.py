"""The optimizers of the schedule: one per phase (reconstruction, generator, classification) and one per
discriminator, built from the recipe's ``[optim.*]`` tables, and the paper's step schedule of their rates."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from aaekit.cpu.master_weights import MasterAdam, MasterSGD, MasterWeights


def make_optimizer(
    settings: dict,
    params: list[torch.nn.Parameter],
    device: torch.device,
    masters: MasterWeights | None = None,
    capturable: bool = False,
) -> torch.optim.Optimizer:
    """``capturable``: every update stays on the device (step counts too), so a CUDA graph can hold it."""
    kind = settings["name"]
    if masters is not None and kind == "sgd":  # bf16 weights with fp32 masters (bf16 on a CPU)
        return MasterSGD(
            params,
            masters,
            lr=settings["lr"],
            momentum=settings["momentum"],
            nesterov=settings["nesterov"],
            weight_decay=settings["weight_decay"],
        )
    if masters is not None:
        return MasterAdam(
            params,
            masters,
            lr=settings["lr"],
            betas=tuple(settings["betas"][:2]),
            weight_decay=settings["weight_decay"],
            decoupled=kind == "adamw",
        )
    if kind == "sgd":
        return torch.optim.SGD(
            params,
            lr=settings["lr"],
            momentum=settings["momentum"],
            nesterov=settings["nesterov"],
            weight_decay=settings["weight_decay"],
            # fused: the gradient scaler (fp16) checks for inf/nan on the device, never on the host
            fused=True if capturable else None,
            foreach=None if capturable else True,
        )
    cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
    # fused kernels do the whole update in one pass; foreach where fused is unavailable
    fused = device.type in ("cuda", "cpu")
    return cls(
        params,
        lr=settings["lr"],
        betas=tuple(settings["betas"][:2]),
        weight_decay=settings["weight_decay"],
        fused=fused,
        foreach=None if fused else True,
        capturable=capturable,
    )


def base_lr(values: dict, optimizer_name: str) -> float:
    """The recipe's rate for an optimizer ("generator", "discriminator.y", ...), with the code's lr_scale."""
    phase, _, code = optimizer_name.partition(".")
    lr = values["optim"][phase]["lr"]
    return lr * values["codes"][code]["discriminator"]["lr_scale"] if code else lr


def phase_optimizers(
    values: dict,
    model,
    trainable_heads: dict,
    classifying: bool,
    device: torch.device,
    masters: MasterWeights | None,
    capturable: bool = False,
) -> dict[str, torch.optim.Optimizer]:
    """{"reconstruction", "discriminator.<code>"..., "generator"[, "classification"]}: what each phase
    updates."""
    optim = values["optim"]
    head_params = [p for h in trainable_heads.values() for p in h.parameters()]
    optimizers = {
        "reconstruction": make_optimizer(
            optim["reconstruction"],
            [*model.encoder.parameters(), *model.decoder.parameters(), *head_params],
            device,
            masters,
            capturable,
        )
    }
    for code, discriminator in model.discriminators.items():
        optimizers[f"discriminator.{code}"] = make_optimizer(
            {**optim["discriminator"], "lr": base_lr(values, f"discriminator.{code}")},
            list(discriminator.parameters()),
            device,
            masters,
            capturable,
        )
    optimizers["generator"] = make_optimizer(
        optim["generator"], list(model.encoder.parameters()), device, masters, capturable
    )
    if classifying:
        optimizers["classification"] = make_optimizer(
            optim["classification"], list(model.encoder.parameters()), device, masters, capturable
        )
    return optimizers


def hot_path(optimizer, acc: Accelerator):
    """The optimizer to call every step. Accelerate's wrapper probes the installed packages on each step()
    (importlib, ~0.1 ms a call) and inspects zero_grad's signature on each zero_grad(); without a gradient
    scaler (fp16), XLA or gradient accumulation it then only forwards to the optimizer it wraps, so that one
    is called directly. Measured on the paper's MNIST setting: about 1 ms of a 25 ms bf16 step."""
    direct = (
        getattr(optimizer, "scaler", None) is None
        and acc.distributed_type != DistributedType.XLA
        and acc.gradient_accumulation_steps == 1
    )
    return optimizer.optimizer if direct and hasattr(optimizer, "optimizer") else optimizer


def uses_master_weights(values: dict, device: torch.device) -> bool:
    """bf16 on a CPU holds bf16 weights with fp32 masters (aaekit/cpu/master_weights.py) unless the recipe
    turns it off."""
    run = values["run"]
    return device.type == "cpu" and run["mixed_precision"] == "bf16" and run["bf16_master_weights"]


def lr_scale(epoch: int, milestones: list[int], gamma: float) -> float:
    """The paper's step schedule: multiply by gamma at each milestone epoch (0-based epochs)."""
    return gamma ** sum(1 for m in milestones if epoch >= m)
