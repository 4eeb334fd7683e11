"""Priors p(z) of the paper: only sampling is needed. Each samples on the engine's device with the
engine's generator, so runs stay seeded."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from aaekit.plugin import Param, Prior, hookimpl


class GaussianPrior(Prior):
    """N(mean, std^2 I) in any dimension (the paper's likelihood setting uses std 5)."""

    name = "gaussian"
    params = {
        "std": Param(float, 1.0, min=0, help="standard deviation of every dimension"),
        "mean": Param(float, 0.0, help="mean of every dimension"),
    }

    def sample(self, n, labels=None, *, generator=None, device="cpu"):
        return self.mean + self.std * torch.randn(n, self.dim, generator=generator, device=device)


class UniformPrior(Prior):
    """Uniform on the cube [low, high]^dim."""

    name = "uniform"
    params = {
        "low": Param(float, -1.0, help="lower end of every dimension"),
        "high": Param(float, 1.0, help="upper end of every dimension"),
    }

    @classmethod
    def check_recipe(cls, params, context):
        return (
            [f"high: must be above low ({params['low']}), got {params['high']}"]
            if params["high"] <= params["low"]
            else []
        )

    def sample(self, n, labels=None, *, generator=None, device="cpu"):
        return self.low + (self.high - self.low) * torch.rand(n, self.dim, generator=generator, device=device)


class GaussianMixturePrior(Prior):
    """K Gaussians: component k is N((shift, 0), diag(std_along^2, std_across^2)) rotated by 2*pi*k/K
    (the paper's 10 2-D Gaussians); in d > 2 dims the extra dimensions are N(0, std_across^2)."""

    name = "gmm"
    params = {
        "components": Param(int, 10, min=1, help="number of components, one per label where labels are used"),
        "shift": Param(float, 1.4, help="distance of each component's centre from the origin"),
        "std_along": Param(float, 0.5, min=0, help="std along the radial direction"),
        "std_across": Param(float, 0.05, min=0, help="std across it"),
        "scale": Param(float, 1.0, min=0, help="multiplies every sample"),
    }

    @classmethod
    def components(cls, params, dim):
        return params["components"]

    @classmethod
    def check_recipe(cls, params, context):
        return (
            []
            if context["dim"] >= 2
            else [f"name: gmm needs a code of at least 2 dims, got {context['dim']}"]
        )

    def sample(self, n, labels=None, *, generator=None, device="cpu"):
        if labels is None:
            labels = torch.randint(self.num_components, (n,), generator=generator, device=device)
        a = torch.randn(n, generator=generator, device=device) * self.std_along + self.shift
        b = torch.randn(n, generator=generator, device=device) * self.std_across
        angle = labels.to(a.dtype) * (2 * math.pi / self.num_components)
        cos, sin = torch.cos(angle), torch.sin(angle)
        xy = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=1)
        if self.dim > 2:
            extra = torch.randn(n, self.dim - 2, generator=generator, device=device) * self.std_across
            xy = torch.cat([xy, extra], dim=1)
        return xy * self.scale


class SwissRollPrior(Prior):
    """A 2-D swiss roll cut into K segments: u ~ U[k/K, (k+1)/K), r = radius*sqrt(u), angle =
    turns*2pi*sqrt(u)."""

    name = "swiss_roll"
    params = {
        "components": Param(int, 10, min=1, help="number of components, one per label where labels are used"),
        "radius": Param(float, 3.0, min=0, help="radius of the roll's outer end"),
        "turns": Param(float, 2.0, min=0, help="full turns of the roll (the paper's 4*pi is 2)"),
    }

    @classmethod
    def components(cls, params, dim):
        return params["components"]

    @classmethod
    def check_recipe(cls, params, context):
        return (
            []
            if context["dim"] == 2
            else [f"name: swiss_roll is 2-D; set the code's dim = 2 (got {context['dim']})"]
        )

    def sample(self, n, labels=None, *, generator=None, device="cpu"):
        if labels is None:
            labels = torch.randint(self.num_components, (n,), generator=generator, device=device)
        u = (
            labels.to(torch.float32) + torch.rand(n, generator=generator, device=device)
        ) / self.num_components
        root = torch.sqrt(u)
        r, angle = self.radius * root, self.turns * 2 * math.pi * root
        return torch.stack([r * torch.cos(angle), r * torch.sin(angle)], dim=1)


class CategoricalPrior(Prior):
    """One-hot vectors of K = dim categories, uniformly drawn (the prior of a categorical code y)."""

    name = "categorical"
    params = {
        "smoothing": Param(
            float,
            0.0,
            min=0,
            max=1,
            help=(
                "mix each one-hot with a uniform point of the simplex by a weight drawn from U(0, "
                "smoothing): the "
                "encoder's softmax is never exactly one-hot, so exact one-hots let the discriminator win on "
                "that alone"
            ),
        ),
    }

    @classmethod
    def components(cls, params, dim):
        return dim

    def sample(self, n, labels=None, *, generator=None, device="cpu"):
        if labels is None:
            labels = torch.randint(self.dim, (n,), generator=generator, device=device)
        y = F.one_hot(labels, self.dim).float()
        if self.smoothing > 0:
            weight = self.smoothing * torch.rand(n, 1, generator=generator, device=device)
            # a uniform point of the simplex: normalised exponentials (Dirichlet(1, ..., 1))
            spread = -torch.log(torch.rand(n, self.dim, generator=generator, device=device).clamp_min(1e-12))
            y = (1 - weight) * y + weight * spread / spread.sum(dim=1, keepdim=True)
        return y


@hookimpl
def register_priors(register):
    for prior in (GaussianPrior, UniformPrior, GaussianMixturePrior, SwissRollPrior, CategoricalPrior):
        register(prior)
