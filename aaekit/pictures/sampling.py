"""`aaekit sample`: decoded prior samples (one column per label where the prior's components are the
classes) or interpolation walks, as one PNG grid built with the helpers of :mod:`aaekit.pictures`."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from aaekit.errors import UserError
from aaekit.pictures import image_grid, save_grid


def _check_image(run) -> None:
    if len(run.model.input_shape) != 2:
        raise UserError(
            f"{run.run_dir}: examples of shape {run.model.input_shape} are not images; "
            "use aaekit.load(...).sample(n) from Python instead"
        )


def per_label(run) -> bool:
    """Whether sampling can pick labels: the decoder takes one, or a prior's components are the classes."""
    m = run.model
    return bool(m.num_classes) and (
        m.label_input or any(p.num_components == m.num_classes for p in m.priors.values())
    )


def write_samples(run, out: Path, num: int | None, labels: list[int] | None, seed: int) -> tuple[int, int]:
    """Write a grid of samples; returns its (rows, columns) in images."""
    _check_image(run)
    if labels is None and per_label(run):
        labels = list(range(run.model.num_classes))
    if labels:
        rows, cols = num or 10, len(labels)
        column_labels = torch.tensor(labels).repeat(rows)  # row-major: each column is one label
        images = run.sample(rows * cols, labels=column_labels, seed=seed)
    else:
        total = num or 100
        cols = math.ceil(math.sqrt(total))
        rows = math.ceil(total / cols)
        images = run.sample(total, seed=seed)
        blank = torch.zeros(rows * cols - total, *images.shape[1:], device=images.device)
        images = torch.cat([images, blank])
    save_grid(image_grid(images, rows, cols), out)
    return rows, cols


def write_interpolation(
    run, out: Path, walks: int, steps: int, labels: list[int] | None, seed: int
) -> tuple[int, int]:
    """One walk per row (label i of ``labels`` for row i, cycled), ``steps`` images along it."""
    _check_image(run)
    row_labels = torch.tensor(labels).repeat(math.ceil(walks / len(labels)))[:walks] if labels else None
    images = run.interpolate(walks, steps, labels=row_labels, seed=seed)
    save_grid(image_grid(images.reshape(walks * steps, *images.shape[2:]), walks, steps), out)
    return walks, steps
