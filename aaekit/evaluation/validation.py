"""Metrics computed on a split, sharded over ranks and gathered (``gather_for_metrics``), so a
multi-process evaluation gives the same numbers as a single-process one."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aaekit.data import DeviceData
from aaekit.model import AAE


@torch.no_grad()
def encode_split(model: AAE, data: DeviceData, accelerator=None, batch_size: int = 1000):
    """Codes and reconstruction errors of a whole split: returns (codes dict, per-example error, labels)."""
    n = len(data)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    shard = torch.arange(rank, n, world, device=data.y.device)
    codes_out: dict[str, list] = {}
    errors, labels = [], []
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=data.y.device).manual_seed(1234)
    for start in range(0, len(shard), batch_size):
        index = shard[start : start + batch_size]
        x = data.inputs(index)
        codes = model.encoder(x, generator=generator)
        recon = model.to_data_space(model.decoder(model.decoder_input(codes, data.y[index])).float())
        errors.append(F.mse_loss(recon, x, reduction="none").mean(dim=1))
        labels.append(data.y[index])
        for k, v in codes.items():
            codes_out.setdefault(k, []).append(v.float())
    model.train(was_training)
    codes_cat = {k: torch.cat(v) for k, v in codes_out.items()}
    error, label = torch.cat(errors), torch.cat(labels)
    if world > 1:
        codes_cat = {k: gather_shards(v, n, accelerator) for k, v in codes_cat.items()}
        error, label = gather_shards(error, n, accelerator), gather_shards(label, n, accelerator)
    return codes_cat, error, label


def gather_shards(t: torch.Tensor, n: int, accelerator) -> torch.Tensor:
    """Reassemble strided shards (rank r holds items r, r+W, ...) into the original order of n items.

    Shards differ in length by at most one, so each is padded to the same length, gathered, interleaved
    and trimmed: exactly the single-process result. (``gather_for_metrics`` trims only for prepared
    dataloaders, which the engine does not use.)"""
    world = accelerator.num_processes
    m = -(-n // world)
    padded = torch.zeros((m, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    gathered = accelerator.gather(padded).reshape(world, m, *t.shape[1:])
    return gathered.transpose(0, 1).reshape(world * m, *t.shape[1:])[:n]


def evaluate_split(model: AAE, data: DeviceData, accelerator=None) -> dict:
    codes, error, labels = encode_split(model, data, accelerator)
    out = {"reconstruction_mse": error.mean().item()}
    for spec in model.codes:
        # only a code with one category per class predicts labels (a K-cluster code does not)
        if spec.kind == "categorical" and spec.dim == model.num_classes and (labels >= 0).any():
            predicted = codes[spec.name].argmax(dim=1)
            known = labels >= 0
            out[f"error.{spec.name}"] = (predicted[known] != labels[known]).float().mean().item()
    return out
