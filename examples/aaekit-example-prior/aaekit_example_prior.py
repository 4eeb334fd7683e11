"""An example aaekit plugin: a prior on the sphere, optionally cut into labelled sectors.

docs/plugins/tutorial.md explains it piece by piece; tests/test_docs.py installs this package and trains
with it.
"""

from __future__ import annotations

import math

import torch

from aaekit.plugin import Param, Prior, hookimpl


class SpherePrior(Prior):
    """Uniform on the sphere of radius `radius` in the code's dimensions, optionally cut into sectors."""

    name = "sphere"  # what a recipe writes: [codes.z.prior] name = "sphere"
    params = {
        "radius": Param(float, 1.0, min=0, help="radius of the sphere"),
        "noise": Param(float, 0.0, min=0, help="std of Gaussian noise added to the radius of each point"),
        "sectors": Param(
            int,
            0,
            min=0,
            help="cut the sphere into this many sectors around its first two axes, "
            "one labelled component each (0: no components)",
        ),
    }

    def __init__(self, dim: int, radius: float = 1.0, noise: float = 0.0, sectors: int = 0):
        super().__init__(dim)
        self.radius, self.noise = radius, noise
        self.num_components = sectors or None  # None: the prior has no labelled components

    @classmethod
    def components(cls, params: dict, dim: int) -> int | None:
        """The number of components, known from the recipe before anything is built."""
        return params["sectors"] or None

    @classmethod
    def check_recipe(cls, params: dict, context: dict) -> list[str]:
        """Problems only the rest of the recipe shows; each names a key of this prior's table."""
        problems = []
        if context["kind"] == "categorical":
            problems.append(
                'name: sphere is a prior for continuous codes; a categorical code takes name = "categorical"'
            )
        if context["dim"] < 2:
            problems.append(f"name: sphere needs a code of at least 2 dims, got dim = {context['dim']}")
        return problems

    def sample(self, n, labels=None, *, generator=None, device="cpu"):
        x = torch.randn(n, self.dim, generator=generator, device=device)
        if labels is not None:
            # The angle of (x0, x1) is uniform and independent of the rest of x; squeezing it into sector k
            # keeps the points uniform within that sector.
            turn = torch.atan2(x[:, 1], x[:, 0]) % (2 * math.pi) / (2 * math.pi)  # in [0, 1)
            angle = (labels.to(x.dtype) + turn) * (2 * math.pi / self.num_components)
            planar = x[:, :2].norm(dim=1)
            x = torch.cat(
                [torch.stack([planar * torch.cos(angle), planar * torch.sin(angle)], dim=1), x[:, 2:]], dim=1
            )
        radius = self.radius + self.noise * torch.randn(n, 1, generator=generator, device=device)
        return radius * x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


@hookimpl
def register_priors(register):
    register(SpherePrior)
