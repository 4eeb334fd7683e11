"""Two-dimensional toy datasets, generated from a seed in a blink: for trying a prior or a recipe change
and for tests. Values are raw coordinates (not in [0, 1]), so recipes use a linear decoder with MSE."""

from __future__ import annotations

import math

import torch

from aaekit.plugin import ArrayData, Dataset, Param, hookimpl

SPLIT_OFFSET = {"train": 0, "test": 1}  # each split has its own stream from the same seed


class ToyDataset(Dataset):
    input_shape = (2,)
    value_range = (-math.inf, math.inf)

    def load(self, split: str) -> ArrayData:
        generator = torch.Generator().manual_seed(self.seed * 2 + SPLIT_OFFSET[split])
        size = self.train_size if split == "train" else self.test_size
        labels = torch.randint(self.num_classes, (size,), generator=generator)
        return ArrayData(self.points(labels, generator), labels)

    def points(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError


COMMON = {
    "train_size": Param(int, 5000, min=1, help="points in the training split"),
    "test_size": Param(int, 1000, min=1, help="points in the test split"),
    "seed": Param(int, 0, min=0, help="the data's own seed (the run seed does not change the data)"),
}


class Mixture(ToyDataset):
    """Gaussian blobs evenly spaced on a circle, labelled by blob."""

    name = "mixture"
    params = {
        **COMMON,
        "components": Param(int, 8, min=2, help="Gaussian blobs on the circle (the classes)"),
        "radius": Param(float, 4.0, min=0, help="radius of the circle"),
        "std": Param(float, 0.5, min=0, help="standard deviation of each blob"),
    }

    def __init__(self, **params):
        super().__init__(**params)
        self.num_classes = self.components

    @classmethod
    def classes(cls, params: dict) -> int | None:
        return params.get("components", cls.params["components"].default)

    def points(self, labels, generator):
        angle = 2 * math.pi * labels.float() / self.num_classes
        centres = self.radius * torch.stack([angle.cos(), angle.sin()], dim=1)
        return centres + self.std * torch.randn(len(labels), 2, generator=generator)


class Rings(ToyDataset):
    """Concentric noisy rings (radius 1, 2, ...), labelled by ring."""

    name = "rings"
    params = {
        **COMMON,
        "rings": Param(int, 3, min=1, help="concentric rings (the classes)"),
        "noise": Param(float, 0.1, min=0, help="std of the radial noise"),
    }

    def __init__(self, **params):
        super().__init__(**params)
        self.num_classes = self.rings

    @classmethod
    def classes(cls, params: dict) -> int | None:
        return params.get("rings", cls.params["rings"].default)

    def points(self, labels, generator):
        angle = 2 * math.pi * torch.rand(len(labels), generator=generator)
        radius = labels.float() + 1 + self.noise * torch.randn(len(labels), generator=generator)
        return radius[:, None] * torch.stack([angle.cos(), angle.sin()], dim=1)


@hookimpl
def register_datasets(register):
    register(Mixture)
    register(Rings)
