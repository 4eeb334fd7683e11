"""The small interfaces a plugin implements: Prior, Posterior, Dataset, Head.

Each component class declares ``name`` (how recipes refer to it), ``params`` (the recipe keys it
accepts, checked before anything is built) and a one-line docstring shown by ``aaekit plugins``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from aaekit.params import Param


def cache_dir() -> Path:
    """Where aaekit and its plugins keep files they derive and can derive again (decoded datasets, the
    compiled optimizer loop): ``$AAEKIT_CACHE_DIR``, else ``~/.cache/aaekit``."""
    return Path(os.environ.get("AAEKIT_CACHE_DIR") or Path.home() / ".cache" / "aaekit")


@dataclass(frozen=True)
class CodeSpec:
    """One latent code of the posterior: continuous (``z``) or categorical (``y``, a softmax)."""

    name: str
    kind: str  # "continuous" | "categorical"
    dim: int


class Component:
    name: ClassVar[str] = ""
    params: ClassVar[dict[str, Param]] = {}

    @classmethod
    def resolved(cls, given: dict) -> dict:
        """The declared parameters' defaults, updated with ``given``: the one place a default is written is
        its ``Param`` (a recipe is resolved the same way before anything is built)."""
        unknown = sorted(set(given) - set(cls.params))
        if unknown:
            raise TypeError(f"{cls.__name__}: no declared parameter {', '.join(unknown)}")
        return {**{k: p.default for k, p in cls.params.items() if not p.required}, **given}

    @classmethod
    def check_recipe(cls, params: dict, context: dict) -> list[str]:
        """Extra checks that need the rest of the recipe (``context``); return problems, one per line.

        ``context`` holds e.g. ``dim`` (the code's size) for a prior. Keys are named relative to the
        component's table, e.g. ``"components: ..."``.
        """
        return []


def set_declared(component: Component, params: dict) -> dict:
    """Every declared parameter of ``component`` (defaults filled) becomes an attribute of the same name,
    unless its class has a method of that name (e.g. a prior's ``components``). Returns the resolved
    parameters."""
    resolved = component.resolved(params)
    for key, value in resolved.items():
        if not callable(getattr(type(component), key, None)):
            setattr(component, key, value)
    return resolved


class Prior(Component):
    """p(z): only sampling is required (the point of the paper).

    ``dim`` is the code size; ``num_components`` is the number of labelled components (mixture
    components, swiss-roll segments, categories) or None. ``sample(n, labels)`` draws, for each row,
    from the component given in ``labels`` (a LongTensor) when the prior has components.
    """

    num_components: int | None = None

    def __init__(self, dim: int, **params):
        """Every declared parameter becomes an attribute of the same name (defaults filled), unless the class
        has a method of that name (e.g. ``components``); ``num_components`` comes from :meth:`components`."""
        self.dim = dim
        self.num_components = type(self).components(set_declared(self, params), dim)

    @classmethod
    def components(cls, params: dict, dim: int) -> int | None:
        """How many labelled components a prior with these params has (checked before building)."""
        return cls.num_components

    def sample(
        self,
        n: int,
        labels: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        raise NotImplementedError


class Posterior(nn.Module, Component):
    """q(codes | x): an nn.Module whose ``forward(x, generator=None)`` returns a dict of codes.

    For each categorical code ``y`` it returns the softmax probabilities under ``y`` and the logits
    under ``y_logits``. ``generator`` drives any noise (reparameterisation, η) so runs stay seeded.
    """

    def __init__(
        self, *, input_dim: int, codes: list[CodeSpec], hidden: list[int], input_noise: float = 0.0, **params
    ):
        super().__init__()
        self.input_dim, self.codes, self.hidden, self.input_noise = (
            input_dim,
            list(codes),
            list(hidden),
            input_noise,
        )
        set_declared(self, params)


@dataclass
class ArrayData:
    """A split held as tensors: ``x`` uint8 (pixels, scaled by 1/255) or float32, ``y`` int64 (-1: none)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]


class Dataset(Component):
    """A source of (x, label) pairs. ``load(split)`` returns ArrayData for "train" or "test".

    Declares ``input_shape`` (of one example, e.g. (28, 28)), ``num_classes`` (or None) and
    ``value_range`` ((0, 1) for pixels).
    """

    input_shape: tuple[int, ...] = ()
    num_classes: int | None = None
    value_range: tuple[float, float] = (0.0, 1.0)

    def __init__(self, **params):
        set_declared(self, params)

    @classmethod
    def classes(cls, params: dict) -> int | None:
        """How many classes the dataset with these params has (checked before loading it)."""
        return cls.num_classes

    @classmethod
    def range_of(cls, params: dict) -> tuple[float, float]:
        """The range of the values ``load`` gives with these params (checked against the decoder output)."""
        return tuple(cls.value_range)

    def load(self, split: str) -> ArrayData:
        raise NotImplementedError


class Head(nn.Module, Component):
    """Adds what a mode needs on top of encoder, decoder and discriminators. Override what applies:

    - ``decoder_input(codes, labels)``: the decoder's input built from the codes (e.g. W_c·y + z);
      return None to keep the default (all codes concatenated).
    - ``reconstruction_penalty()``: a loss added in the reconstruction phase (e.g. cluster-head distance).
    - ``encoder_penalty(x, codes, encode, generator)``: a loss on this mini-batch's codes, also added in the
      reconstruction phase: ``codes`` are those of ``x``, ``encode(x2)`` encodes other inputs (e.g.
      augmented views of ``x``) and ``generator`` is the run's noise stream, so resuming stays exact.
    - ``classification_loss(codes, labels)``: the semi-supervised phase's loss on a labelled batch.
    - ``decoder_input_dim``: the size of what ``decoder_input`` returns, when it returns something.
    """

    decoder_input_dim: int | None = None

    def __init__(
        self, *, codes: list[CodeSpec], num_classes: int | None, input_shape: tuple[int, ...] = (), **params
    ):
        super().__init__()
        self.codes = list(codes)
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)  # of one example, e.g. (28, 28)
        set_declared(self, params)

    def forward(self, codes: dict, labels: torch.Tensor | None) -> torch.Tensor | None:
        # forward is decoder_input, so a head with weights trains through its DDP wrapper
        return self.decoder_input(codes, labels)

    def decoder_input(self, codes: dict, labels: torch.Tensor | None) -> torch.Tensor | None:
        return None

    def reconstruction_penalty(self) -> torch.Tensor | None:
        return None

    def encoder_penalty(
        self, x: torch.Tensor, codes: dict, encode, generator: torch.Generator
    ) -> torch.Tensor | None:
        return None

    def classification_loss(self, codes: dict, labels: torch.Tensor) -> torch.Tensor | None:
        return None

    @classmethod
    def defines_classification_loss(cls) -> bool:
        """Whether this head class adds a semi-supervised loss (known before anything is built)."""
        return cls.classification_loss is not Head.classification_loss

    @property
    def has_classification_loss(self) -> bool:
        return self.defines_classification_loss()
