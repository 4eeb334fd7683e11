"""Encoder posteriors q(z|x) of the paper (§2): deterministic, Gaussian, universal approximator."""

from __future__ import annotations

import torch
from torch import nn

from aaekit.plugin import CodeSpec, Param, Posterior, hookimpl, mlp

TRUNK_PARAMS = {
    "batch_norm": Param(
        bool, False, help="batch-normalise every hidden layer of the encoder before its ReLU"
    ),
    "input_dropout": Param(
        float,
        0.0,
        min=0.0,
        max=0.9,
        help="while training, zero this fraction of the encoder's input values (scaled up to keep "
        "the mean), drawn from the run's noise stream so that resuming stays exact",
    ),
    "logit_batch_norm": Param(
        bool,
        False,
        help="batch-normalise the logits of every categorical code (learned scale and shift) "
        "before the softmax, so that q(y|x) can grow nearly one-hot",
    ),
}


class MLPPosterior(Posterior):
    """An MLP trunk with one output layer per code; categorical codes are a softmax."""

    def __init__(
        self, *, input_dim: int, codes: list[CodeSpec], hidden: list[int], extra_inputs: int = 0, **params
    ):
        super().__init__(input_dim=input_dim, codes=codes, hidden=hidden, **params)  # the declared keys
        last_norm = [nn.BatchNorm1d(hidden[-1])] if self.batch_norm else []
        self.trunk = nn.Sequential(
            mlp([input_dim + extra_inputs, *hidden], batch_norm=self.batch_norm), *last_norm, nn.ReLU()
        )
        self.outputs = nn.ModuleDict({c.name: nn.Linear(hidden[-1], self.output_size(c)) for c in codes})
        self.logit_norms = nn.ModuleDict(
            {
                c.name: nn.BatchNorm1d(c.dim)
                for c in codes
                if self.logit_batch_norm and c.kind == "categorical"
            }
        )

    def output_size(self, code: CodeSpec) -> int:
        return code.dim

    def continuous(self, out: torch.Tensor, generator) -> torch.Tensor:
        return out

    def trunk_input(self, x: torch.Tensor, generator) -> torch.Tensor:
        return x

    def dropped_out(self, x: torch.Tensor, generator) -> torch.Tensor:
        # our own mask rather than nn.Dropout: torch's global RNG is not part of a checkpoint, the noise
        # stream is
        keep = 1.0 - self.input_dropout
        mask = torch.rand(x.shape, generator=generator, device=x.device) < keep
        return x * mask.to(x.dtype) / keep

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        if self.training and self.input_dropout > 0:
            x = self.dropped_out(x, generator)
        h = self.trunk(self.trunk_input(x, generator))
        codes = {}
        for spec in self.codes:
            out = self.outputs[spec.name](h)
            if spec.name in self.logit_norms:
                out = self.logit_norms[spec.name](out)
            if spec.kind == "categorical":
                codes[f"{spec.name}_logits"] = out
                codes[spec.name] = torch.softmax(out.float(), dim=1).to(out.dtype)
            else:
                codes[spec.name] = self.continuous(out, generator)
        return codes


class DeterministicPosterior(MLPPosterior):
    """z = f(x)."""

    name = "deterministic"
    params = dict(TRUNK_PARAMS)


class GaussianPosterior(MLPPosterior):
    """z ~ N(mu(x), sigma(x)^2), reparameterised; the mean when evaluating."""

    name = "gaussian"
    params = {
        **TRUNK_PARAMS,
        "min_logvar": Param(float, -10.0, help="lower clamp on log sigma^2, for stability"),
    }

    def output_size(self, code: CodeSpec) -> int:
        return code.dim if code.kind == "categorical" else 2 * code.dim

    def continuous(self, out: torch.Tensor, generator) -> torch.Tensor:
        mean, logvar = out.chunk(2, dim=1)
        if not self.training:
            return mean
        std = torch.exp(0.5 * logvar.clamp(min=self.min_logvar))
        return mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)


class UniversalPosterior(MLPPosterior):
    """z = f(x, eta): noise eta of a fixed distribution is a second input of the network (not added to x)."""

    name = "universal"
    params = {
        **TRUNK_PARAMS,
        "noise_dim": Param(int, 100, min=1, help="size of the noise input eta"),
        "noise": Param(str, "gaussian", choices=("gaussian", "uniform"), help="distribution of eta"),
        "noise_std": Param(float, 1.0, min=0, help="scale of eta (std, or half-width when uniform)"),
    }

    def __init__(self, **kwargs):
        declared = self.resolved({k: v for k, v in kwargs.items() if k in self.params})
        super().__init__(extra_inputs=declared["noise_dim"], **kwargs)

    def trunk_input(self, x: torch.Tensor, generator) -> torch.Tensor:
        shape = (x.shape[0], self.noise_dim)
        if self.noise == "gaussian":
            eta = torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype) * self.noise_std
        else:
            eta = (
                torch.rand(shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
            ) * self.noise_std
        return torch.cat([x, eta], dim=1)


@hookimpl
def register_posteriors(register):
    register(DeterministicPosterior)
    register(GaussianPosterior)
    register(UniversalPosterior)
