"""Recipes: TOML files naming registered components. Parsed, overridden, validated completely (every
problem reported at once, one line each) and resolved (defaults filled) before anything is built."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from aaekit.errors import RecipeError, UserError
from aaekit.params import Param, ParamSet, RawOverride, did_you_mean

PHASES = ("reconstruction", "discriminator", "generator", "classification")

# The engine's own keys. Component tables (data, encoder, codes.*.prior, heads.*) also accept the
# keys their component declares.
CORE: dict[str, dict[str, Param]] = {
    "run": {
        "name": Param(
            str,
            "",
            check=lambda v: name_problem(v),
            help="run directory name under runs/ (a plain folder name, no path); defaults to the "
            "recipe's stem",
        ),
        "seed": Param(
            int,
            0,
            min=0,
            help="seeds the weights, the batch order, the labelled subset and every noise stream",
        ),
        "threads": Param(
            int,
            0,
            min=0,
            help="CPU threads for torch's operators (0: torch's default, one per core). "
            "When other work keeps the cores busy, fewer threads can be many times faster",
        ),
        "mixed_precision": Param(
            str,
            "no",
            choices=("no", "bf16", "fp16"),
            help="Accelerate's mixed precision; bf16 on a CPU, fp16 on GPUs only",
        ),
        "flush_denormals": Param(
            bool,
            True,
            help="on a CPU, round numbers below ~1e-38 to zero on every compute "
            "thread (denormals put the CPU on a slow path: 10-40 % of a step once Adam's "
            "state holds them); false keeps strict IEEE arithmetic",
        ),
        "bf16_master_weights": Param(
            bool,
            True,
            help='with mixed_precision = "bf16" on a CPU: layers hold bf16 '
            "weights and the optimizers (Adam, AdamW, SGD) update fp32 masters, writing the "
            "bf16 copy in the same pass (autocast's numbers without its per-step casts); "
            "false: plain autocast",
        ),
        "cuda_graphs": Param(
            str,
            "off",
            choices=("off", "on", "auto"),
            help="on one GPU: record the whole training step once as a CUDA graph and replay it (one "
            'launch instead of hundreds); "auto": where it can run, "on": an error where it cannot',
        ),
    },
    "data": {
        "name": Param(str, help='the dataset plugin, e.g. name = "mnist"'),
        "labelled": Param(
            (int, float, str),
            "all",
            check=lambda v: labelled_problem(v),
            help='"all", a count of labelled training images, or a fraction in (0, 1]; the rest are '
            "unlabelled",
        ),
        "validation": Param(int, 0, min=0, help="training images held out for per-epoch validation"),
        "in_memory": Param(
            (bool, str),
            "auto",
            check=lambda v: in_memory_problem(v),
            help='"auto": hold the training split on the device when it fits in half the free '
            "memory, else stream it; true/false force one way",
        ),
    },
    "encoder": {
        "name": Param(str, help='the posterior plugin: "deterministic", "gaussian" or "universal"'),
        "hidden": Param(list, [1000, 1000], item=int, min=1, min_len=1, help="sizes of the hidden layers"),
        "input_noise": Param(float, 0.0, min=0, help="std of Gaussian noise added to the encoder input (§5)"),
    },
    "decoder": {
        "hidden": Param(list, [1000, 1000], item=int, min=1, min_len=1, help="sizes of the hidden layers"),
        "output": Param(str, "sigmoid", choices=("sigmoid", "linear"), help="the decoder's last activation"),
        "loss": Param(
            str,
            "mse",
            choices=("mse", "bce"),
            help="reconstruction loss: squared error or binary cross-entropy",
        ),
        "label_input": Param(bool, False, help="feed the one-hot label to the decoder beside the codes (§4)"),
    },
    "code": {
        "kind": Param(
            str, "continuous", choices=("continuous", "categorical"), help="a real vector, or a softmax (y)"
        ),
        "dim": Param(int, min=1, help="the code's size (categories, for a categorical code)"),
    },
    "discriminator": {
        "hidden": Param(list, [1000, 1000], item=int, min=1, min_len=1, help="sizes of the hidden layers"),
        "label_conditioned": Param(bool, False, help="discriminator also sees the one-hot label (§2.3)"),
        "weight": Param(float, 1.0, min=0, help="weight of this code's generator loss"),
        "lr_scale": Param(
            float,
            1.0,
            min=0,
            help="this discriminator's learning rate as a multiple of "
            "optim.discriminator.lr (one code's game can be slowed without the others)",
        ),
        "input_noise": Param(
            float,
            0.0,
            min=0,
            help="std of Gaussian noise added to everything the discriminator "
            "sees, prior samples and codes alike (keeps it from winning on exact one-hots)",
        ),
    },
    "optim": {
        "name": Param(str, "adam", choices=("adam", "adamw", "sgd"), help="the optimizer of this phase"),
        "lr": Param(float, 1e-3, min=0, help="learning rate (scaled by train.lr_milestones)"),
        "momentum": Param(float, 0.0, min=0, max=1, help="SGD only"),
        "nesterov": Param(bool, False, help="SGD only"),
        "betas": Param(list, [0.5, 0.999], item=float, min=0, max=1, min_len=2, help="Adam and AdamW only"),
        "weight_decay": Param(float, 0.0, min=0, help="L2 penalty (decoupled for AdamW)"),
    },
    "train": {
        "epochs": Param(int, 100, min=1, help="passes over the training split"),
        "max_steps": Param(int, 0, min=0, help="stop after this many steps (0: no cap)"),
        "batch_size": Param(int, 100, min=1, help="examples per step, over all processes together"),
        "checkpoint_every": Param(int, 1000, min=0, help="steps between checkpoints (0: only at the end)"),
        "keep_checkpoints": Param(
            int, 3, min=1, help="newest checkpoints kept on disk; older ones are removed"
        ),
        "log_every": Param(int, 50, min=1, help="steps between metric lines"),
        "lr_milestones": Param(
            list, [], item=int, min=1, help="epochs at which every learning rate is scaled"
        ),
        "lr_gamma": Param(float, 0.1, min=0),
        "pictures": Param(bool, True, help="write samples.png, reconstructions.png, latent.png"),
        "imbalance_warning_steps": Param(
            int, 500, min=0, help="warn when one side of a discriminator wins for this many steps (0: never)"
        ),
    },
}
TOP_LEVEL = ("run", "data", "encoder", "decoder", "codes", "heads", "optim", "train")


@dataclass
class Recipe:
    """A validated, resolved recipe: ``values`` holds every key with defaults filled in."""

    path: Path
    values: dict

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def get(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.values
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def codes(self) -> dict[str, dict]:
        return self.values["codes"]

    def dumps(self) -> str:
        return dump_toml(self.values)


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: recipe file not found; check the path (shipped recipes are in recipes/)")
    if path.is_dir():
        raise UserError(f"{path}: is a directory; give a recipe .toml file")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file; give a recipe .toml file") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML: {exc}; fix the syntax at that line") from None


def parse_override(item: str) -> tuple[str, RawOverride]:
    if "=" not in item:
        raise UserError(f"override {item!r}: expected KEY=VALUE, e.g. train.epochs=3")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"override {item!r}: expected a dotted key such as train.epochs")
    try:
        parsed = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = raw
    return key, RawOverride(raw, parsed)


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    for item in overrides:
        key, value = parse_override(item)
        node = values
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"override {item!r}: {part} is a value, not a table")
            node = child
        node[parts[-1]] = value
    return values


def load_recipe(path: str | Path, overrides: list[str] | None = None, registry=None) -> Recipe:
    """Read, override, validate and resolve a recipe; raise RecipeError listing every problem."""
    from aaekit.plugins import get_registry

    path = Path(path)
    overrides = list(overrides or [])
    raw = apply_overrides(read_toml(path), overrides)
    values, problems = validate(raw, registry or get_registry(), default_name=path.stem)
    if problems:
        raise RecipeError([blame(p, path, overrides) for p in problems])
    return Recipe(path, values)


def blame(problem: str, path: Path, overrides: list[str]) -> str:
    """Name where a problem's key came from: the command line's KEY=VALUE when an override set it, else the
    file."""
    key = problem.split(":", 1)[0]
    for item in overrides:
        if item.split("=", 1)[0].strip() == key:
            return f"command-line override {item!r} (applied to {path}): {problem}"
    return f"{path}: {problem}"


def _table(raw: dict, key: str, where: str, problems: list[str], required: bool = False) -> dict:
    value = raw.get(key, {} if not required else None)
    if value is None:
        problems.append(f"{where}{key}: missing table [{where}{key}]")
        return {}
    if not isinstance(value, dict):
        problems.append(f"{where}{key}: expected a table, got {value!r}")
        return {}
    return value


def _component(registry, kind: str, table: dict, core: dict[str, Param], where: str, problems: list[str]):
    """Check a table that names a component: its core keys plus what the component declares."""
    name = table.get("name")
    if isinstance(name, RawOverride):
        name = str(name)
    if name is None:
        names = ", ".join(sorted(registry.components[kind]))
        problems.append(f"{where}name: missing; name a registered {kind} (available: {names})")
        return None, {}
    if not isinstance(name, str) or name not in registry.components[kind]:
        problems.append(f"{where}name: {registry.unknown(kind, str(name))}")
        return None, {}
    entry = registry.components[kind][name]
    declared = dict(getattr(entry.cls, "params", {}) or {})
    clash = set(declared) & set(core)
    params = ParamSet({**declared, **core})
    resolved, found = params.check({k: v for k, v in table.items()}, where)
    problems.extend(found)
    if clash:
        problems.append(f"{where}name: {kind} {name!r} declares keys reserved by aaekit: {sorted(clash)}")
    resolved["name"] = name
    # checks that need the component's params run only when those params are valid
    return (None if found else entry), resolved


def validate(raw: dict, registry, default_name: str = "run") -> tuple[dict, list[str]]:
    problems: list[str] = []
    out: dict = {}
    for key in raw:
        if key not in TOP_LEVEL:
            problems.append(
                f"{key}: unknown table{did_you_mean(key, TOP_LEVEL)}; known tables: {', '.join(TOP_LEVEL)}"
            )

    run, p = ParamSet(CORE["run"]).check(_table(raw, "run", "", problems), "run.")
    problems += p
    run["name"] = run.get("name") or default_name
    if name_problem(run["name"]):  # the default, from the file's name
        problems.append(f"run.name: {name_problem(run['name'])}")
    out["run"] = run

    data_entry, data = _component(
        registry, "dataset", _table(raw, "data", "", problems, True), CORE["data"], "data.", problems
    )
    out["data"] = data
    try:
        num_classes = data_entry.cls.classes(data) if data_entry else None
    except UserError as exc:  # a dataset that must look at its files to count classes
        problems.append(str(exc))
        data_entry, num_classes = None, None

    enc_entry, encoder = _component(
        registry,
        "posterior",
        _table(raw, "encoder", "", problems, True),
        CORE["encoder"],
        "encoder.",
        problems,
    )
    out["encoder"] = encoder

    decoder, p = ParamSet(CORE["decoder"]).check(_table(raw, "decoder", "", problems), "decoder.")
    problems += p
    out["decoder"] = decoder
    problems += decoder_matches_data(
        decoder, data_entry.cls.range_of(data) if data_entry else None, data.get("name")
    )
    if decoder.get("label_input") and data_entry and not num_classes:
        problems.append(
            f"decoder.label_input: dataset {data['name']!r} has no labels; set label_input = false"
        )
    if decoder.get("label_input") and data.get("labelled", "all") not in ("all", 1.0):
        # The decoder would be fed labels of images the recipe declares unlabelled (the §4 model needs them
        # all).
        problems.append(
            f"decoder.label_input: needs every training label, but data.labelled = "
            f'{data.get("labelled")!r}; set data.labelled = "all" or label_input = false'
        )

    codes_raw = _table(raw, "codes", "", problems, True)
    if not codes_raw and "codes" in raw:
        problems.append(
            "codes: declare at least one code, e.g. [codes.z] dim = 8 with a [codes.z.prior] table"
        )
    out["codes"] = {}
    for code_name, code_raw in codes_raw.items():
        where = f"codes.{code_name}."
        if not isinstance(code_raw, dict):
            problems.append(f"codes.{code_name}: expected a table, got {code_raw!r}")
            continue
        prior_raw = _table(code_raw, "prior", where, problems, True)
        disc_raw = _table(code_raw, "discriminator", where, problems)
        rest = {k: v for k, v in code_raw.items() if k not in ("prior", "discriminator")}
        code, p = ParamSet(CORE["code"]).check(rest, where)
        problems += p
        disc, p = ParamSet(CORE["discriminator"]).check(disc_raw, where + "discriminator.")
        problems += p
        prior_entry, prior = _component(
            registry, "prior", prior_raw, {"name": Param(str)}, where + "prior.", problems
        )
        if prior_entry is not None and "dim" in code:
            context = {"dim": code["dim"], "kind": code.get("kind"), "num_classes": num_classes}
            problems += [f"{where}prior.{m}" for m in prior_entry.cls.check_recipe(prior, context)]
            components = prior_entry.cls.components(prior, code["dim"])
            if disc.get("label_conditioned") and data_entry is not None:
                if not num_classes:
                    problems.append(
                        f"{where}discriminator.label_conditioned: dataset {data.get('name')!r} "
                        "has no labels; set label_conditioned = false"
                    )
                elif not components:
                    problems.append(
                        f"{where}discriminator.label_conditioned: prior {prior['name']!r} has no "
                        "components to match labels to; use a prior with components (e.g. gmm) "
                        "or set label_conditioned = false"
                    )
                elif components != num_classes:
                    problems.append(
                        f"{where}discriminator.label_conditioned: prior {prior['name']!r} has "
                        f"{components} components but dataset {data.get('name')!r} has "
                        f"{num_classes} classes; make them equal"
                    )
            if code.get("kind") == "categorical" and components != code["dim"]:
                problems.append(
                    f"{where}prior.name: a categorical code needs a prior with one component per "
                    f'category ({code["dim"]}), e.g. name = "categorical"'
                )
        code["prior"] = prior
        code["discriminator"] = disc
        out["codes"][code_name] = code
    if enc_entry is not None and out["codes"]:
        context = {"codes": out["codes"]}
        problems += [f"encoder.{m}" for m in enc_entry.cls.check_recipe(encoder, context)]

    out["heads"] = {}
    has_classification = False
    for head_key, head_raw in _table(raw, "heads", "", problems).items():
        if not isinstance(head_raw, dict):
            problems.append(f"heads.{head_key}: expected a table, got {head_raw!r}")
            continue
        entry, head = _component(
            registry, "head", head_raw, {"name": Param(str)}, f"heads.{head_key}.", problems
        )
        if entry is not None:
            context = {
                "codes": out["codes"],
                "num_classes": num_classes,
                "decoder": decoder,
                "input_shape": tuple(data_entry.cls.input_shape) if data_entry else None,
            }
            problems += [f"heads.{head_key}.{m}" for m in entry.cls.check_recipe(head, context)]
            has_classification |= entry.cls.defines_classification_loss()
        out["heads"][head_key] = head
    if has_classification and not num_classes:
        problems.append(
            f"heads: a classification head needs a labelled dataset; {data.get('name')!r} has none"
        )

    optim_raw = _table(raw, "optim", "", problems)
    out["optim"] = {}
    for phase in optim_raw:
        if phase not in PHASES:
            problems.append(
                f"optim.{phase}: unknown phase{did_you_mean(phase, PHASES)}; phases: {', '.join(PHASES)}"
            )
    for phase in PHASES:
        phase_raw = _table(optim_raw, phase, "optim.", problems)
        settings, p = ParamSet(CORE["optim"]).check(phase_raw, f"optim.{phase}.")
        problems += p
        out["optim"][phase] = settings

    train, p = ParamSet(CORE["train"]).check(_table(raw, "train", "", problems), "train.")
    problems += p
    out["train"] = train
    return out, problems


def name_problem(name: str) -> str | None:
    """A run name becomes runs/<name>: it must not climb out of runs/ or name a hidden or absolute path."""
    if not name or (not any(c in name for c in "/\\\0:") and not name.startswith(".")):
        return None
    return (
        f"{name!r} is not a plain folder name (no '/', '\\', '..' or leading '.'); runs go under runs/, use "
        "--output-dir to choose another folder"
    )


def labelled_problem(labelled) -> str | None:
    if isinstance(labelled, str) and labelled != "all":
        return f'expected "all", a count or a fraction in (0, 1], got {labelled!r}'
    if isinstance(labelled, float) and not 0 < labelled <= 1:
        return f"a fraction must be in (0, 1], got {labelled}"
    if isinstance(labelled, int) and labelled < 0:
        return f"a count must be >= 0, got {labelled}"
    return None


def in_memory_problem(value) -> str | None:
    if isinstance(value, str) and value != "auto":
        return f'expected "auto", true or false, got {value!r}'
    return None


def decoder_matches_data(decoder: dict, value_range, dataset: str) -> list[str]:
    """A sigmoid output or a binary cross-entropy needs data in [0, 1]; bce is defined on sigmoid outputs."""
    problems = []
    output, loss = decoder.get("output"), decoder.get("loss")
    if output == "linear" and loss == "bce":
        problems.append(
            'decoder.loss: "bce" treats the decoder output as logits of values in [0, 1]; with '
            'output = "linear" use loss = "mse" (or output = "sigmoid")'
        )
    if value_range is None:
        return problems
    low, high = value_range
    if low >= 0 and high <= 1:
        return problems
    shown = f"[{low:g}, {high:g}]"
    if output == "sigmoid":
        problems.append(
            f'decoder.output: "sigmoid" gives values in (0, 1) but dataset {dataset!r} declares '
            f'values in {shown}; use output = "linear" with loss = "mse" (or scale the data to [0, 1])'
        )
    elif loss == "bce":
        problems.append(
            f'decoder.loss: "bce" needs targets in [0, 1] but dataset {dataset!r} declares values in '
            f'{shown}; use loss = "mse"'
        )
    return problems


def dump_toml(values: dict) -> str:
    """Write a resolved recipe as TOML (tables of scalars and lists; enough for recipes)."""
    lines: list[str] = []

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        if isinstance(v, float):
            if math.isnan(v):
                return "nan"
            if math.isinf(v):
                return "inf" if v > 0 else "-inf"
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=False)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    def table(prefix: str, node: dict) -> None:
        plain = {k: v for k, v in node.items() if not isinstance(v, dict)}
        nested = {k: v for k, v in node.items() if isinstance(v, dict)}
        if prefix and (plain or not nested):
            lines.append(f"[{prefix}]")
        for k, v in plain.items():
            lines.append(f"{_key(k)} = {scalar(v)}")
        if prefix and (plain or not nested):
            lines.append("")
        for k, v in nested.items():
            table(f"{prefix}.{_key(k)}" if prefix else _key(k), v)

    table("", values)
    return "\n".join(lines).rstrip() + "\n"


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)


def dataset_params(data: dict) -> dict:
    """The keys of a resolved ``[data]`` table that belong to the dataset plugin (not to the engine)."""
    return {k: v for k, v in data.items() if k not in CORE["data"]}
