"""Helpers for tests that check what a feature produces, not only that it ran: what a decoder was given
(observed with a forward hook, nothing replaced), PNG grids read back, and which arm of the gmm prior a 2-D
point lies on."""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

# matplotlib's gray colour map has 256 levels: a value v is written as floor(256 v) / 255, up to 1.8/255 off
PNG_TOLERANCE = 2.5 / 255


@contextmanager
def decoder_inputs(input_width: int):
    """The inputs (rows x ``input_width``) of every MLP (nn.Sequential starting with a Linear layer that takes
    ``input_width`` values) called in eval mode while the block runs, in call order: what a decoder is given
    when a picture or a sample is made, in this process (the in-process CLI included). Training steps run the
    modules in train mode and are not recorded."""
    seen: list[torch.Tensor] = []

    def hook(module, args):
        if (
            isinstance(module, nn.Sequential)
            and not module.training
            and len(module)
            and isinstance(module[0], nn.Linear)
            and module[0].in_features == input_width
            and args
            and isinstance(args[0], torch.Tensor)
        ):
            seen.append(args[0].detach().float().cpu().clone())

    handle = nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def read_grid(path: Path) -> torch.Tensor:
    """A grey PNG grid written by aaekit, as an (H, W) tensor of values in [0, 1]."""
    import matplotlib.image

    pixels = torch.from_numpy(matplotlib.image.imread(str(path))).float()
    return pixels[..., 0] if pixels.dim() == 3 else pixels


def as_grid(images: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(rows*cols, H, W) images, row-major, as one (rows*H, cols*W) picture (the layout of aaekit's grids)."""
    h, w = images.shape[-2:]
    return images.reshape(rows, cols, h, w).permute(0, 2, 1, 3).reshape(rows * h, cols * w)


def same_picture(png: torch.Tensor, images: torch.Tensor, tolerance: float = PNG_TOLERANCE) -> bool:
    """Whether a PNG read back shows these images (to the PNG's rounding, or ``tolerance``)."""
    return png.shape == images.shape and bool((png - images.clamp(0, 1)).abs().max() <= tolerance)


def component_of(z: torch.Tensor, components: int = 10) -> torch.Tensor:
    """Which arm of the gmm prior (component k along the angle 2*pi*k/K) each 2-D point lies on."""
    angle = torch.remainder(torch.atan2(z[:, 1], z[:, 0]), 2 * math.pi)
    return torch.round(angle / (2 * math.pi / components)).long() % components


def far_from_centre(z: torch.Tensor) -> torch.Tensor:
    """Points whose arm is clear. Near the centre the arms overlap, and a draw whose distance along its arm
    (N(1.4, 0.5^2)) is below -0.8 lies on the opposite arm: 5 in 10^6 draws."""
    return z.norm(dim=1) > 0.8
