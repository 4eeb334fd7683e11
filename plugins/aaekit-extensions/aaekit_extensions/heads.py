"""Heads that depart from the paper."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from aaekit.plugin import Head, Param, UserError, hookimpl


class AugmentationConsistencyHead(Head):
    """Augmented views of an image get its categorical code (not in the paper; cf. IMSAT, VAT).

    Each image of the mini-batch is warped by a random affine map (rotation, shift, scale); the loss
    weight * CE(q(y|x), q(y|x')) pulls the code of the view x' to the code of x (held fixed), added in the
    reconstruction phase. The pixels of a digit move under such maps while its class does not, so a
    cluster must hold what survives them: the digit more than its position, slant or size.
    """

    name = "augmentation_consistency"
    params = {
        "code": Param(str, "y", help="the categorical code kept the same across views"),
        "weight": Param(float, 1.0, min=0, help="weight of the consistency loss"),
        "rotation": Param(float, 10.0, min=0, max=180, help="largest rotation, in degrees"),
        "shift": Param(float, 2.0, min=0, help="largest shift along each axis, in pixels"),
        "scale": Param(float, 0.1, min=0, max=0.9, help="largest relative change of size"),
    }

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if len(self.input_shape) != 2:
            raise UserError(self.not_images(self.input_shape))

    @staticmethod
    def not_images(shape) -> str:
        return (
            f"name: augmentation_consistency warps images of shape (height, width); this dataset's examples "
            f"have shape {tuple(shape)}; use a dataset of 2-D images or remove this head"
        )

    @classmethod
    def check_recipe(cls, params, context):
        problems = []
        code = context["codes"].get(params["code"])
        if code is None:
            problems.append(
                f"code: no code named {params['code']!r}; declare [codes.{params['code']}] kind = "
                f'"categorical"'
            )
        elif code["kind"] != "categorical":
            problems.append(f"code: {params['code']!r} must be categorical")
        shape = context.get("input_shape")
        if shape and len(shape) != 2:  # () when the dataset knows its shape only once loaded
            problems.append(cls.not_images(shape))
        return problems

    def views(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One random affine view of each (flattened) image of x, drawn from ``generator``."""
        n, (h, w) = x.shape[0], self.input_shape

        def uniform(bound: float) -> torch.Tensor:
            return (torch.rand(n, generator=generator, device=x.device) * 2 - 1) * bound

        angle, size = uniform(math.radians(self.rotation)), 1 + uniform(self.scale)
        # affine_grid maps output to input coordinates in [-1, 1]: a shift of s pixels is 2 s / w (or / h)
        dx, dy = uniform(2 * self.shift / w), uniform(2 * self.shift / h)
        cos, sin = torch.cos(angle) / size, torch.sin(angle) / size
        theta = torch.stack([torch.stack([cos, -sin, dx], 1), torch.stack([sin, cos, dy], 1)], 1)
        images = x.float().reshape(n, 1, h, w)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return warped.reshape(n, h * w).to(x.dtype)

    def encoder_penalty(self, x, codes, encode, generator):
        target = codes[self.code].detach().float()
        logits = encode(self.views(x, generator))[f"{self.code}_logits"].float()
        return self.weight * F.cross_entropy(logits, target)  # probabilities as targets


@hookimpl
def register_heads(register):
    register(AugmentationConsistencyHead)
