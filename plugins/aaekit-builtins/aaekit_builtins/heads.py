"""Heads: what a mode adds on top of encoder, decoder and discriminators."""

from __future__ import annotations

import torch.nn.functional as F

from aaekit.contracts import Head
from aaekit.hookspecs import hookimpl
from aaekit.params import Param


class ClassifierHead(Head):
    """Semi-supervised phase (§5): cross-entropy of q(y|x) on labelled mini-batches."""

    name = "classifier"
    params = {"code": Param(str, "y", help="the categorical code that predicts the label"),
              "weight": Param(float, 1.0, min=0)}

    def __init__(self, *, code: str = "y", weight: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.code, self.weight = code, weight

    @classmethod
    def check_recipe(cls, params, context):
        code = context["codes"].get(params["code"])
        if code is None:
            return [f"code: no code named {params['code']!r}; declare [codes.{params['code']}] kind = \"categorical\""]
        if code["kind"] != "categorical":
            return [f"code: {params['code']!r} must be categorical to classify"]
        if context["num_classes"] and code["dim"] != context["num_classes"]:
            return [f"code: {params['code']!r} has {code['dim']} categories but the dataset has "
                    f"{context['num_classes']} classes"]
        return []

    def classification_loss(self, codes, labels):
        return self.weight * F.cross_entropy(codes[f"{self.code}_logits"].float(), labels)


@hookimpl
def register_heads(register):
    register(ClassifierHead)
