"""The adversarial autoencoder assembled from a recipe: posterior, decoder, one discriminator per code,
priors and heads. The same builder serves training and ``aaekit.load``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from aaekit.contracts import CodeSpec, Head, Posterior, Prior


def mlp(sizes: list[int], activation: type[nn.Module] = nn.ReLU, batch_norm: bool = False) -> nn.Sequential:
    """Linear layers of the given sizes with ``activation`` between them (none after the last), each hidden
    layer batch-normalised before its activation when ``batch_norm``."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            if batch_norm:
                layers.append(nn.BatchNorm1d(b))
            layers.append(activation())
    return nn.Sequential(*layers)


def one_hot_with_unlabelled(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One-hot of ``labels`` with one extra slot (index ``num_classes``) for "unlabelled" (label -1)."""
    index = torch.where(labels < 0, torch.full_like(labels, num_classes), labels)
    return F.one_hot(index, num_classes + 1)


class AAE(nn.Module):
    """All trainable parts, as children named the way ``model.safetensors`` keys are prefixed:
    ``encoder.``, ``decoder.``, ``discriminators.<code>.``, ``heads.<key>.``."""

    def __init__(
        self,
        *,
        encoder: Posterior,
        decoder: nn.Module,
        discriminators: dict[str, nn.Module],
        heads: dict[str, Head],
        priors: dict[str, Prior],
        codes: list[CodeSpec],
        label_conditioned: dict[str, bool],
        input_shape: tuple[int, ...],
        num_classes: int | None,
        output: str,
        label_input: bool,
    ):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.discriminators = nn.ModuleDict(discriminators)
        self.heads = nn.ModuleDict(heads)
        self.priors = priors
        self.codes = codes
        self.label_conditioned = label_conditioned
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.output = output
        self.label_input = label_input

    @property
    def input_dim(self) -> int:
        return math.prod(self.input_shape)

    def decoder_input(
        self, codes: dict, labels: torch.Tensor | None, heads: dict | None = None
    ) -> torch.Tensor:
        """The decoder's input: what a head builds (e.g. W_c·y + z), else every code concatenated, plus
        the one-hot label where the recipe feeds it (§4). ``heads`` may be the prepared (wrapped) heads."""
        for head in (heads if heads is not None else self.heads).values():
            built = head(codes, labels)
            if built is not None:
                return built
        parts = [codes[spec.name] for spec in self.codes]
        if self.label_input:
            parts.append(F.one_hot(labels.clamp(min=0), self.num_classes).to(parts[0].dtype))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def to_data_space(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.output == "sigmoid" else logits

    @torch.no_grad()
    def sample(
        self, n: int, labels: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Decode prior samples into data space; ``labels`` pick the component (and the decoder's label
        input where it has one) per row."""
        codes, decoder_labels = self.prior_codes(n, labels, generator)
        logits = self.decoder(self.decoder_input(codes, decoder_labels)).float()
        return self.to_data_space(logits).reshape(n, *self.input_shape)

    @torch.no_grad()
    def prior_codes(
        self, n: int, labels: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[dict, torch.Tensor | None]:
        """``n`` draws of every code's prior, and the labels the decoder takes with them (or None)."""
        device = next(self.decoder.parameters()).device
        if labels is not None:
            labels = labels.to(device)
        codes = {}
        for spec in self.codes:
            prior = self.priors[spec.name]
            components = None
            if prior.num_components:
                if labels is not None and prior.num_components == self.num_classes:
                    components = labels
                else:
                    components = torch.randint(prior.num_components, (n,), generator=generator, device=device)
            codes[spec.name] = prior.sample(n, components, generator=generator, device=device)
        decoder_labels = (
            labels
            if labels is not None
            else (
                torch.randint(self.num_classes, (n,), generator=generator, device=device)
                if self.label_input
                else None
            )
        )
        return codes, decoder_labels

    def discriminator_input(
        self, code_name: str, values: torch.Tensor, labels: torch.Tensor | None
    ) -> torch.Tensor:
        if not self.label_conditioned.get(code_name):
            return values
        return torch.cat([values, one_hot_with_unlabelled(labels, self.num_classes).to(values.dtype)], dim=1)


def build_model(recipe, registry, input_shape: tuple[int, ...], num_classes: int | None) -> AAE:
    values = recipe.values if hasattr(recipe, "values") else recipe
    input_dim = math.prod(input_shape)
    codes = [CodeSpec(name, c["kind"], c["dim"]) for name, c in values["codes"].items()]

    def params_of(table: dict, core_keys) -> dict:
        return {k: v for k, v in table.items() if k not in core_keys}

    enc = values["encoder"]
    posterior_cls = registry.get("posterior", enc["name"]).cls
    encoder = posterior_cls(
        input_dim=input_dim,
        codes=codes,
        hidden=list(enc["hidden"]),
        input_noise=enc["input_noise"],
        **params_of(enc, ("name", "hidden", "input_noise")),
    )

    priors, discriminators, conditioned = {}, {}, {}
    for spec in codes:
        code = values["codes"][spec.name]
        prior_cls = registry.get("prior", code["prior"]["name"]).cls
        priors[spec.name] = prior_cls(dim=spec.dim, **params_of(code["prior"], ("name",)))
        disc = code["discriminator"]
        conditioned[spec.name] = bool(disc["label_conditioned"])
        extra = (num_classes + 1) if disc["label_conditioned"] else 0
        discriminators[spec.name] = mlp([spec.dim + extra, *disc["hidden"], 1])

    heads = {}
    for key, head in values["heads"].items():
        head_cls = registry.get("head", head["name"]).cls
        heads[key] = head_cls(
            codes=codes, num_classes=num_classes, input_shape=input_shape, **params_of(head, ("name",))
        )

    dec = values["decoder"]
    decoder_in = next((h.decoder_input_dim for h in heads.values() if h.decoder_input_dim), None)
    if decoder_in is None:
        decoder_in = sum(s.dim for s in codes) + (num_classes if dec["label_input"] else 0)
    decoder = mlp([decoder_in, *dec["hidden"], input_dim])
    return AAE(
        encoder=encoder,
        decoder=decoder,
        discriminators=discriminators,
        heads=heads,
        priors=priors,
        codes=codes,
        label_conditioned=conditioned,
        input_shape=input_shape,
        num_classes=num_classes,
        output=dec["output"],
        label_input=dec["label_input"],
    )


@torch.no_grad()
def check_component_outputs(model: AAE, x: torch.Tensor, sources: dict, autocast) -> None:
    """Run every component once on a few examples before training and check the shapes of what it returns, so
    a plugin's mistake is named (plugin, component, expected and received) instead of surfacing as a traceback
    deep in a phase. In eval mode with its own generator: no batch-norm statistics or noise stream change."""
    from aaekit.errors import PluginError

    def blame(key: str, what: str, expected, got) -> PluginError:
        src = sources.get(key, {})
        return PluginError(
            f"{key}: {src.get('kind', 'component')} {src.get('name', '?')!r} from plugin "
            f"{src.get('plugin', '?')} ({src.get('distribution', '?')}) returned {what} of shape "
            f"{got}, expected {expected}; fix the plugin"
        )

    n, device = x.shape[0], x.device
    generator = torch.Generator(device=device).manual_seed(0)
    was_training = model.training
    model.eval()
    try:
        for spec in model.codes:
            prior = model.priors[spec.name]
            components = (
                torch.randint(prior.num_components, (n,), generator=generator, device=device)
                if prior.num_components
                else None
            )
            got = prior.sample(n, components, generator=generator, device=device)
            if not isinstance(got, torch.Tensor) or tuple(got.shape) != (n, spec.dim):
                shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                raise blame(f"codes.{spec.name}.prior", "samples", (n, spec.dim), shape)
        with autocast():
            codes = model.encoder(x, generator=generator)
        for spec in model.codes:
            got = codes.get(spec.name) if isinstance(codes, dict) else None
            if not isinstance(got, torch.Tensor) or tuple(got.shape) != (n, spec.dim):
                shape = tuple(got.shape) if isinstance(got, torch.Tensor) else "nothing"
                raise blame("encoder", f"code {spec.name!r}", (n, spec.dim), shape)
        labels = torch.zeros(n, dtype=torch.long, device=device) if model.num_classes else None
        with autocast():
            for key, head in model.heads.items():
                built = head(codes, labels)
                width = model.decoder[0].in_features
                if built is not None and tuple(built.shape) != (n, width):
                    raise blame(f"heads.{key}", "a decoder input", (n, width), tuple(built.shape))
                penalty = head.encoder_penalty(
                    x, codes, lambda views: model.encoder(views, generator=generator), generator
                )
                if penalty is not None and (not isinstance(penalty, torch.Tensor) or penalty.dim() != 0):
                    got = (
                        tuple(penalty.shape) if isinstance(penalty, torch.Tensor) else type(penalty).__name__
                    )
                    raise blame(f"heads.{key}", "an encoder penalty", "() (one number)", got)
    finally:
        model.train(was_training)
