"""Heads: what a mode adds on top of encoder, decoder and discriminators."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aaekit.plugin import Head, Param, hookimpl


class ClassifierHead(Head):
    """Semi-supervised phase (§5): cross-entropy of q(y|x) on labelled mini-batches."""

    name = "classifier"
    params = {
        "code": Param(str, "y", help="the categorical code that predicts the label"),
        "weight": Param(float, 1.0, min=0, help="weight of the cross-entropy in the classification phase"),
    }

    @classmethod
    def check_recipe(cls, params, context):
        code = context["codes"].get(params["code"])
        if code is None:
            return [
                f"code: no code named {params['code']!r}; declare [codes.{params['code']}] kind = "
                f'"categorical"'
            ]
        if code["kind"] != "categorical":
            return [f"code: {params['code']!r} must be categorical to classify"]
        if context["num_classes"] and code["dim"] != context["num_classes"]:
            return [
                f"code: {params['code']!r} has {code['dim']} categories but the dataset has "
                f"{context['num_classes']} classes"
            ]
        return []

    def classification_loss(self, codes, labels):
        return self.weight * F.cross_entropy(codes[f"{self.code}_logits"].float(), labels)


class ClusterHeadsHead(Head):
    """Dimensionality reduction (§7): decoder input W_c·y + z, with a penalty keeping cluster heads apart.

    W_c (m x n) holds one learned cluster head c_i per category of y (m categories, z has n dims), so the
    representation of x is its soft cluster's head plus its style z. Penalty (added to the
    reconstruction loss): weight * -sum_{i<j} min(||c_i - c_j||, eta); it pushes every pair of heads
    closer than eta apart and is flat beyond eta (the paper's "penalise distances smaller than eta").
    """

    name = "cluster_heads"
    params = {
        "code_y": Param(str, "y", help="the categorical code (m clusters)"),
        "code_z": Param(str, "z", help="the continuous code (n dims) added to the cluster head"),
        "eta": Param(float, 1.0, min=0, help="distance beyond which two heads are no longer pushed apart"),
        "weight": Param(float, 1.0, min=0, help="weight of the head-distance penalty"),
        "init_std": Param(float, 1.0, min=0, help="std of the heads' N(0, std^2) initial values"),
    }

    def __init__(self, **kwargs):
        super().__init__(**kwargs)  # code_y, code_z, eta, weight, init_std become attributes
        dims = {c.name: c.dim for c in self.codes}
        self.decoder_input_dim = dims[self.code_z]
        # W_c, one row per cluster
        self.heads = nn.Parameter(torch.randn(dims[self.code_y], dims[self.code_z]) * self.init_std)

    @classmethod
    def check_recipe(cls, params, context):
        problems = []
        for key, kind in (("code_y", "categorical"), ("code_z", "continuous")):
            code = context["codes"].get(params[key])
            if code is None:
                problems.append(
                    f'{key}: no code named {params[key]!r}; declare [codes.{params[key]}] kind = "{kind}"'
                )
            elif code["kind"] != kind:
                problems.append(f"{key}: code {params[key]!r} must be {kind}")
        if len(context["codes"]) != 2 and not problems:
            problems.append(
                "name: cluster_heads builds the decoder input from exactly its two codes; "
                f"the recipe declares {len(context['codes'])}"
            )
        if context["decoder"].get("label_input"):
            problems.append(
                "name: cluster_heads builds the decoder input itself; set decoder.label_input = false"
            )
        return problems

    def decoder_input(self, codes, labels):
        y = codes[self.code_y]
        return y.to(self.heads.dtype) @ self.heads + codes[self.code_z]

    def reconstruction_penalty(self):
        i, j = torch.triu_indices(len(self.heads), len(self.heads), offset=1, device=self.heads.device)
        diff = self.heads[i] - self.heads[j]
        distance = torch.sqrt((diff * diff).sum(dim=1) + 1e-12)  # eps: a finite gradient if two heads meet
        return -self.weight * torch.clamp(distance, max=self.eta).sum()

    def landmarks(self) -> torch.Tensor:
        """Points to mark in pictures of the decoder-input space: the cluster heads."""
        return self.heads.detach()


@hookimpl
def register_heads(register):
    register(ClassifierHead)
    register(ClusterHeadsHead)
