"""The Python API: a finished run directory back as a model you can call.

    import aaekit
    run = aaekit.load("runs/gmm_label")
    codes = run.encode(images)            # {"z": ...} (and "y", "y_logits" for a categorical code)
    images = run.sample(20, labels=[3] * 20)

The model is rebuilt from the run's resolved ``recipe.toml`` through the same plugin registry and
``build_model`` as training, and its weights come from ``model.safetensors`` (never a pickle). Weights are
saved unwrapped and in fp32 whatever the run's launcher or mixed precision, so every run loads the same way.
This is the one model-loading function of aaekit; ``aaekit eval`` and ``aaekit sample`` use it too.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from aaekit.errors import RecipeError, UserError
from aaekit.model import AAE, build_model
from aaekit.recipe import Recipe


class LoadedRun:
    """A trained model in eval mode, with the recipe and registry it was built from."""

    def __init__(
        self,
        run_dir: Path,
        recipe: Recipe,
        registry,
        model: AAE,
        device: torch.device,
        weights_path: Path | None = None,
    ):
        self.run_dir = run_dir
        self.weights_path = weights_path or run_dir / "model.safetensors"
        self.recipe = recipe
        self.registry = registry
        self.model = model
        self.device = device

    def __repr__(self) -> str:
        codes = ", ".join(f"{c.name}:{c.kind}[{c.dim}]" for c in self.model.codes)
        return f"LoadedRun({str(self.run_dir)!r}, codes=({codes}), device={self.device})"

    # --- inputs ---------------------------------------------------------------------------------------
    def _as_inputs(self, x) -> torch.Tensor:
        """Examples as the encoder takes them: (n, D) floats; uint8 pixels are scaled as in training. Accepts
        one example or a batch, each shaped like the data (``input_shape``) or flat (D values)."""
        x = torch.as_tensor(x)
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        x = x.to(self.device, torch.float32)
        shape, dim = tuple(self.model.input_shape), self.model.input_dim
        if tuple(x.shape) in (shape, (dim,)):  # a single example
            x = x.unsqueeze(0)
        if x.dim() < 1 or tuple(x.shape[1:]) not in (shape, (dim,)):
            raise UserError(
                f"inputs of shape {tuple(x.shape)} do not fit this model, which takes a batch of "
                f"shape (N, {', '.join(map(str, shape))}) or (N, {dim}), or a single example"
            )
        return x.reshape(x.shape[0], dim)

    def _as_labels(self, labels, n: int) -> torch.Tensor | None:
        if labels is None:
            return None
        if not self.model.num_classes:
            raise UserError("labels given, but this model's dataset has no classes")
        labels = torch.as_tensor(labels, dtype=torch.long).to(self.device).flatten()
        if labels.numel() == 1 and n > 1:
            labels = labels.expand(n)
        if labels.numel() != n:
            raise UserError(
                f"{labels.numel()} labels given for {n} rows; give one label per row (or one for all)"
            )
        bad = labels[(labels < 0) | (labels >= self.model.num_classes)]
        if len(bad):
            raise UserError(
                f"label {int(bad[0])} is out of range; labels are 0..{self.model.num_classes - 1}"
            )
        return labels

    # --- the model ------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x) -> dict[str, torch.Tensor]:
        """Codes of ``x`` (deterministic: a Gaussian posterior gives its mean): {code name: (n, dim)},
        plus ``<name>_logits`` for categorical codes."""
        return {k: v.float() for k, v in self.model.encoder(self._as_inputs(x)).items()}

    @torch.no_grad()
    def decode(self, codes, labels=None) -> torch.Tensor:
        """Decode codes into data space, shaped like the examples. ``codes`` is a dict {code name: (n, dim)}
        or, for a model with one code, a tensor. ``labels`` are needed where the decoder takes the label."""
        if not isinstance(codes, dict):
            if len(self.model.codes) != 1:
                names = ", ".join(c.name for c in self.model.codes)
                raise UserError(
                    f"this model has several codes ({names}); pass decode a dict {{name: tensor}}"
                )
            codes = {self.model.codes[0].name: codes}
        missing = [c.name for c in self.model.codes if c.name not in codes]
        if missing:
            raise UserError(f"decode: no value for code(s) {', '.join(missing)}")
        codes = {k: torch.as_tensor(v).to(self.device, torch.float32) for k, v in codes.items()}
        for spec in self.model.codes:
            if codes[spec.name].dim() == 1:
                codes[spec.name] = codes[spec.name].unsqueeze(0)
        n = codes[self.model.codes[0].name].shape[0]
        labels = self._as_labels(labels, n)
        if self.model.label_input and labels is None:
            raise UserError("this model's decoder takes the label as an input; pass labels=")
        logits = self.model.decoder(self.model.decoder_input(codes, labels)).float()
        return self.model.to_data_space(logits).reshape(n, *self.model.input_shape)

    @torch.no_grad()
    def sample(self, n: int, labels=None, seed: int | None = None) -> torch.Tensor:
        """``n`` decoded prior samples; ``labels`` pick the prior component (and decoder label) per row."""
        generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        return self.model.sample(n, self._as_labels(labels, n), generator)

    @torch.no_grad()
    def interpolate(self, n: int, steps: int = 10, labels=None, seed: int | None = None) -> torch.Tensor:
        """``n`` straight walks in code space between two prior draws, decoded at ``steps`` evenly spaced
        points: (n, steps, *input_shape). With ``labels``, both ends of row i come from label i's
        component."""
        if steps < 2:
            raise UserError(f"interpolate: steps must be at least 2, got {steps}")
        generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        labels = self._as_labels(labels, n)
        start, decoder_labels = self.model.prior_codes(n, labels, generator)
        end, _ = self.model.prior_codes(n, labels, generator)
        t = torch.linspace(0, 1, steps, device=self.device).view(1, steps, 1)
        walk = {
            k: torch.lerp(start[k].float().unsqueeze(1), end[k].float().unsqueeze(1), t).reshape(
                n * steps, -1
            )
            for k in start
        }
        walk_labels = decoder_labels.repeat_interleave(steps) if decoder_labels is not None else None
        logits = self.model.decoder(self.model.decoder_input(walk, walk_labels)).float()
        return self.model.to_data_space(logits).reshape(n, steps, *self.model.input_shape)

    @property
    def categorical_code(self) -> str | None:
        return next((c.name for c in self.model.codes if c.kind == "categorical"), None)

    @torch.no_grad()
    def classify(self, x) -> torch.Tensor:
        """The predicted class (argmax of the categorical code) of each example."""
        name = self.categorical_code
        if name is None:
            raise UserError(
                f"{self.run_dir}: this model has no categorical code, so it cannot classify; "
                'classify() needs a recipe with a code of kind "categorical"'
            )
        return self.model.encoder(self._as_inputs(x))[name].argmax(dim=1)

    def dataset(self):
        """The run's dataset component, built from its recipe (for evaluating on its splits)."""
        data = self.recipe.values["data"]
        cls = self.registry.get("dataset", data["name"]).cls
        from aaekit.recipe import dataset_params

        return cls(**dataset_params(data))


def missing_plugins_hint(record: dict | None, registry) -> str:
    """Which components of the run are not registered now, and where they came from when it was trained."""
    if record is None:
        return "; a plugin the run used may have changed or be missing (see `aaekit plugins`)"
    missing = [
        f"{key} = {src['kind']} {src['name']!r} (from {src['plugin']})"
        for key, src in record.get("components", {}).items()
        if src["name"] not in registry.components.get(src["kind"], {})
    ]
    hint = f"; not registered now: {', '.join(missing)}" if missing else ""
    dirs = record.get("plugins_dirs", [])
    gone = [d for d in dirs if not Path(d).is_dir()]
    if gone:
        hint += (
            f"; the run was trained with --plugins-dir {' '.join(gone)}, which no longer exists: pass "
            "--plugins-dir with the folder that now holds those plugin files"
        )
    elif missing:
        hint += "; install the plugin that provides it, or pass --plugins-dir with the folder of its .py file"
    return hint


def load(
    run_dir,
    *,
    device: str | torch.device = "cpu",
    registry=None,
    plugins_dirs=(),
    checkpoint: str | None = None,
) -> LoadedRun:
    """Rebuild the trained model of ``run_dir`` (its ``recipe.toml`` and ``model.safetensors``). With
    ``checkpoint`` ("latest", a step number or a folder name under ``checkpoints/``) the weights come from
    that checkpoint instead: an unfinished or crashed run can be evaluated, or a run at several points of
    training."""
    from aaekit.checkpoint import checkpoint_model, load_tensors
    from aaekit.plugins import get_registry
    from aaekit.recipe import load_recipe
    from aaekit.runs import read_model_record

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(
            f"{run_dir}: no such run directory; give the folder `aaekit run` wrote (e.g. runs/<name>)"
        )
    recipe_path = run_dir / "recipe.toml"
    weights_path = run_dir / "model.safetensors"
    if not recipe_path.is_file():
        raise UserError(f"{recipe_path}: missing; {run_dir} is not a run directory written by `aaekit run`")
    if checkpoint is None and not weights_path.is_file():
        hint = (
            "the run has checkpoints but did not finish; finish it with `aaekit run <recipe> --resume "
            f"--output-dir {run_dir}`, or evaluate its newest checkpoint with --checkpoint latest"
            if (run_dir / "checkpoints").is_dir()
            else "was the run finished?"
        )
        raise UserError(f"{weights_path}: missing; {hint}")
    record = read_model_record(run_dir)
    recorded_dirs = [d for d in (record or {}).get("plugins_dirs", []) if Path(d).is_dir()]
    if registry is None:  # the plugin folders the run was trained with come along, where they still exist
        registry = get_registry([*plugins_dirs, *(d for d in recorded_dirs if d not in plugins_dirs)])
    try:
        recipe = load_recipe(recipe_path, [], registry)
    except RecipeError as exc:
        raise UserError(
            f"{recipe_path}: the run's stored recipe no longer validates: "
            + "; ".join(p.split(": ", 1)[-1] for p in exc.problems)
            + missing_plugins_hint(record, registry)
        ) from None

    if record is not None:
        input_shape, num_classes = record["input_shape"], record["num_classes"]
    else:  # a run from before model.json: the dataset class's shape (right for datasets with a fixed shape)
        data = recipe.values["data"]
        dataset_cls = registry.get("dataset", data["name"]).cls
        input_shape, num_classes = tuple(dataset_cls.input_shape), dataset_cls.classes(data)
    model = build_model(recipe, registry, input_shape, num_classes)
    if checkpoint is None:
        weights = load_tensors(weights_path, "model weights")
    else:
        weights_path, weights = checkpoint_model(run_dir / "checkpoints", str(checkpoint))
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    wrong_shape = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        detail = "; ".join(
            part
            for part in (
                f"missing {', '.join(missing[:4])}" if missing else "",
                f"unexpected {', '.join(unexpected[:4])}" if unexpected else "",
                f"wrong shape {', '.join(wrong_shape[:4])}" if wrong_shape else "",
            )
            if part
        )
        raise UserError(
            f"{weights_path}: the weights do not match {recipe_path} ({detail}); "
            "the two files come from different runs"
        )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in weights.items()})
    device = torch.device(device)
    model.to(device).eval()
    if not all(math.isfinite(v) for v in (p.float().abs().max().item() for p in model.parameters())):
        raise UserError(f"{weights_path}: holds non-finite weights (NaN/inf); the run diverged; retrain it")
    return LoadedRun(run_dir, recipe, registry, model, device, weights_path)
