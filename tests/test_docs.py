"""The documentation, checked like code (in the spirit of datasette's documentation tests).

- The site builds with ``mkdocs build --strict``: a broken link or anchor, or a page missing from the
  navigation, fails.
- Every recipe key (core and every registered component's), every CLI command and option, every hook, every
  ``Param`` option, every key of ``check_recipe``'s context and every exported name of ``aaekit.plugin`` is
  documented; the context and the labels a prior's ``sample`` receives are observed in a real run.
- Every fenced code block in README.md, docs/ and examples/ runs or is validated: Python blocks run against
  tiny trained runs, TOML recipes (whole or fragments) go through ``aaekit validate``, shell commands are
  parsed by the program they call (aaekit's click commands, accelerate's and torchrun's parsers, the
  benchmark scripts' options, pip's paths and extras), and blocks that include files of the example plugin
  are covered by installing that package and training with it.
"""

from __future__ import annotations

import dataclasses
import html
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import tomllib

from conftest import ROOT, TINY, aaekit

DOCS = ROOT / "docs"
EXAMPLE = ROOT / "examples" / "aaekit-example-prior"
LANGUAGES = ("bash", "toml", "python", "text")
FENCE = re.compile(r"^```([^\s`]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
SNIPPET = re.compile(r'^--8<-- "([^"]+)"$')


def markdown_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted(DOCS.rglob("*.md")), *sorted((ROOT / "examples").rglob("*.md"))]
    return [f for f in files if "site" not in f.relative_to(ROOT).parts]


def code_blocks(path: Path) -> list[tuple[str, str, int]]:
    """(language, code, line) of every fenced block of a markdown file."""
    text = path.read_text(encoding="utf-8")
    return [(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)]


def load_hooks():
    spec = importlib.util.spec_from_file_location("aaekit_docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def slug(text: str) -> str:
    """Python-Markdown's toc slug (what MkDocs and, for these headings, GitHub produce)."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(path: Path) -> set[str]:
    found = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"#{1,6} (.*?)(?: \{#([\w-]+)\})?$", line)
        if m:
            found.add(m.group(2) or slug(re.sub(r"[`*]", "", m.group(1))))
    return found


def section(doc: str, element_id: str) -> str:
    """The HTML from the heading with this id to the next heading of the same or a higher level."""
    m = re.search(rf'<h([1-6])[^>]*\bid="{re.escape(element_id)}"', doc)
    assert m, f"no heading with id {element_id!r}"
    level = int(m.group(1))
    end = re.compile(rf"<h[1-{level}][ >]").search(doc, m.end())
    return doc[m.start() : end.start() if end else len(doc)]


# ---- the site ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.fail('MkDocs is not installed: pip install -e ".[docs]" (.ci/setup installs the docs extra)')
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-5000:]
    assert "WARNING" not in build.stderr, build.stderr[-5000:]
    return out


def page(site: Path, name: str) -> str:
    """A built page's HTML with entities decoded, so that help texts compare as written."""
    return html.unescape((site / name / "index.html").read_text(encoding="utf-8"))


def test_site_builds_strict_with_every_page_in_the_nav(site):
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert "strict: true" in config and "omitted_files: warn" in config and "anchors: warn" in config
    for md in DOCS.rglob("*.md"):
        rel = md.relative_to(DOCS).as_posix()
        assert rel in config, f"docs/{rel} is not in mkdocs.yml's nav"
        built = site / ("index.html" if rel == "index.md" else rel[:-3] + "/index.html")
        assert built.is_file(), f"docs/{rel} was not built"
    assert "<!-- generated:" not in "".join(p.read_text(encoding="utf-8") for p in site.rglob("*.html"))


def test_every_recipe_key_is_in_the_reference(site):
    from aaekit.plugins import KINDS, get_registry
    from aaekit.recipe import CORE

    doc = page(site, "reference/recipes")
    for table, params in CORE.items():
        part = section(doc, f"core-{table}")
        for key in params:
            assert f"<code>{key}</code>" in part, (
                f"core key {table}.{key} is missing from the recipe reference"
            )
    registry = get_registry()
    for kind in KINDS:
        for name, entry in registry.components[kind].items():
            part = section(doc, f"{kind}-{name.replace('_', '-')}")
            for key, param in (entry.cls.params or {}).items():
                assert f"<code>{key}</code>" in part, f"{kind} {name!r}: key {key!r} is missing"
                if param.help:
                    assert param.help.split()[0] in part, f"{kind} {name!r}: help of {key!r} is missing"
    hooks = load_hooks()
    assert len(hooks.recipe_keys()) == sum(len(p) for p in CORE.values()) + sum(
        len(e.cls.params or {}) for k in KINDS for e in registry.components[k].values()
    )


def test_every_cli_command_and_option_is_in_the_reference(site):
    import click

    from aaekit.cli import cli

    doc = page(site, "reference/cli")
    root = click.Context(cli, info_name="aaekit")
    for option in cli.params:
        for flag in option.opts + option.secondary_opts:
            assert flag in section(doc, "aaekit"), f"aaekit {flag} is missing from the CLI reference"
    for name in cli.list_commands(root):
        command = cli.get_command(root, name)
        part = section(doc, f"aaekit-{name}")
        assert command.help.split()[0] in part
        for param in command.params:
            names = (
                (param.opts + param.secondary_opts)
                if isinstance(param, click.Option)
                else [param.human_readable_name]
            )
            for flag in names:
                assert flag in part, f"aaekit {name} {flag} is missing from the CLI reference"


def test_the_results_pages_cover_every_report(site):
    results, benchmarks = page(site, "results"), page(site, "benchmarks")
    for report in sorted((ROOT / "benchmarks" / "results").iterdir()):
        if report.suffix in (".json", ".jsonl"):
            assert report.name in results + benchmarks, f"{report.name} is on neither results nor benchmarks"
    # a generated table, not a marker
    assert "NVIDIA H100 80GB HBM3" in results and "312.4 ± 2.1 nats" in results


def test_the_plugin_api_is_documented():
    import aaekit.hookspecs
    import aaekit.plugin
    from aaekit.plugin import Dataset, Param

    api = (DOCS / "plugins" / "api.md").read_text(encoding="utf-8")
    hooks = [n for n, f in vars(aaekit.hookspecs).items() if hasattr(f, "aaekit_spec")]
    assert sorted(hooks) == ["register_datasets", "register_heads", "register_posteriors", "register_priors"]
    for hook in hooks:
        assert f"`{hook}(register)`" in api, f"hook {hook} is not documented in docs/plugins/api.md"
    for name in aaekit.plugin.__all__:
        assert f"`{name}" in api, f"aaekit.plugin.{name} is not documented"
    param_part = api[api.index("## `Param`") : api.index("## The four kinds")]
    for field in dataclasses.fields(Param):
        assert f"| `{field.name}` |" in param_part, f"Param option {field.name!r} is not documented"
    dataset_part = api[api.index("### Dataset") : api.index("### Head")]
    for attribute in ("input_shape", "num_classes", "value_range"):
        assert hasattr(Dataset, attribute) and f"`{attribute}`" in dataset_part
    assert "may\n  set for itself" in dataset_part or "may set for itself" in dataset_part
    for needle in ("--plugins-dir", "AAEKIT_PLUGINS_DIR", "model.json", "never `-1`"):
        assert needle in api


SPY_PLUGIN = '''
import json
import os

from aaekit.plugin import Head, hookimpl
from aaekit_builtins.posteriors import DeterministicPosterior
from aaekit_builtins.priors import GaussianMixturePrior, GaussianPrior


def record(*item):
    with open(os.environ["AAEKIT_DOCS_SPY"], "a") as fh:
        fh.write(json.dumps(item) + "\\n")


class SpyPrior(GaussianMixturePrior):
    """Records what it is given."""
    name = "spy_prior"

    @classmethod
    def check_recipe(cls, params, context):
        record("context", "prior", sorted(context))
        return super().check_recipe(params, context)

    def sample(self, n, labels=None, *, generator=None, device="cpu"):
        record("labels", "spy_prior", None if labels is None else [int(labels.min()), int(labels.max())])
        return super().sample(n, labels, generator=generator, device=device)


class SpyFlat(GaussianPrior):
    """Records what it is given."""
    name = "spy_flat"

    def sample(self, n, labels=None, *, generator=None, device="cpu"):
        record("labels", "spy_flat", None if labels is None else "given")
        return super().sample(n, labels, generator=generator, device=device)


class SpyPosterior(DeterministicPosterior):
    """Records what it is given."""
    name = "spy_posterior"

    @classmethod
    def check_recipe(cls, params, context):
        record("context", "posterior", sorted(context))
        return []


class SpyHead(Head):
    """Records what it is given."""
    name = "spy_head"

    @classmethod
    def check_recipe(cls, params, context):
        record("context", "head", sorted(context))
        return []


@hookimpl
def register_priors(register):
    register(SpyPrior)
    register(SpyFlat)


@hookimpl
def register_posteriors(register):
    register(SpyPosterior)


@hookimpl
def register_heads(register):
    register(SpyHead)
'''

SPY_RECIPE = """
[data]
name = "mnist"
labelled = 40

[encoder]
name = "spy_posterior"

[codes.z]
dim = 2
[codes.z.prior]
name = "spy_prior"
[codes.z.discriminator]
hidden = [16]
label_conditioned = true

[codes.w]
dim = 2
[codes.w.prior]
name = "spy_flat"
[codes.w.discriminator]
hidden = [16]

[heads.spy]
name = "spy_head"

[train]
pictures = false
"""


def test_check_recipe_context_and_sample_labels_are_as_documented(tmp_path):
    """A one-off plugin records what aaekit hands it while a tiny run trains; the plugin API must say so."""
    (tmp_path / "spy").mkdir()
    (tmp_path / "spy" / "spy.py").write_text(SPY_PLUGIN)
    (tmp_path / "spy.toml").write_text(SPY_RECIPE)
    log = tmp_path / "spy.jsonl"
    out = aaekit(
        "run",
        str(tmp_path / "spy.toml"),
        *TINY,
        "--plugins-dir",
        str(tmp_path / "spy"),
        "--output-dir",
        str(tmp_path / "run"),
        env={"AAEKIT_DOCS_SPY": str(log)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    seen = [json.loads(line) for line in log.read_text().splitlines()]

    api = (DOCS / "plugins" / "api.md").read_text(encoding="utf-8")
    table = api[api.index("| kind | `context` keys |") :]
    for kind in ("prior", "posterior", "head"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {kind} |"))
        documented = set(re.findall(r"`(\w+)`", row.split("|")[2]))
        recorded = {tuple(keys) for tag, k, keys in seen if tag == "context" and k == kind}
        assert recorded == {tuple(sorted(documented))}, (
            f"{kind}: context {recorded} but the docs say {documented}"
        )

    labels = [item for item in seen if item[0] == "labels"]
    with_components = [r for _, name, r in labels if name == "spy_prior"]
    assert with_components and all(r is not None and 0 <= r[0] and r[1] <= 9 for r in with_components)
    assert all(r is None for _, name, r in labels if name == "spy_flat")


# ---- the code blocks ---------------------------------------------------------------------------------------
BASE_RECIPE = {
    "data": {"name": "mnist"},
    "encoder": {"name": "deterministic"},
    "codes": {"z": {"dim": 2, "prior": {"name": "gaussian"}}},
}


def merged(base: dict, fragment: dict) -> dict:
    out = json.loads(json.dumps(base))
    for key, value in fragment.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def validate_recipe(path: Path, overrides=(), env=None) -> None:
    out = aaekit("validate", str(path), *overrides, env=env)
    assert out.returncode == 0, f"aaekit validate {path} {' '.join(overrides)}:\n{out.stderr[-3000:]}"


def check_toml(code: str, where: str, tmp_path: Path) -> None:
    from aaekit.recipe import dump_toml

    values = tomllib.loads(code)
    if "project" in values or "build-system" in values:
        pytest.fail(f"{where}: a pyproject.toml must be included from examples/ (--8<--), not copied")
    if not {"data", "codes"} <= set(values):  # a fragment: laid over a minimal recipe
        values = merged(BASE_RECIPE, values)
    path = tmp_path / f"block-{abs(hash(where))}.toml"
    path.write_text(dump_toml(values))
    validate_recipe(path)


def shell_commands(code: str) -> list[list[str]]:
    """Each simple command of a shell block (comments dropped, continuation lines joined, && ; | split)."""
    per_line = []  # line by line: shlex drops newlines, and one line must never run into the next
    for line in code.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        current = []
        for token in lexer:
            if token in ("&&", "||", ";", "|", "&"):
                per_line.append(current)
                current = []
            else:
                current.append(token)
        per_line.append(current)
    return [c for c in per_line if c]


# aaekit commands on the example plugin's files: checked once it is installed
DEFERRED: list[tuple[str, list[str]]] = []


def check_aaekit(args: list[str], where: str) -> None:
    import click

    from aaekit.cli import cli

    root = click.Context(cli, info_name="aaekit")
    if not args or args[0] in ("--version", "-h", "--help"):
        return
    command = cli.get_command(root, args[0])
    assert command is not None, f"{where}: no command `aaekit {args[0]}`"
    try:
        command.make_context(args[0], list(args[1:]), parent=root)
    except click.exceptions.Exit:
        pass
    except click.ClickException as exc:
        pytest.fail(f"{where}: `aaekit {' '.join(args)}`: {exc.format_message()}")
    if args[0] not in ("run", "validate"):
        return
    plain = [a for a in args[1:] if not a.startswith("-")]
    skip = {
        args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--output-dir", "--plugins-dir", "--log-with")
    }
    plain = [a for a in plain if a not in skip]
    overrides = [a for a in plain if "=" in a and not a.endswith(".toml")]
    recipes = [a for a in plain if a not in overrides]
    expanded = [str(p.relative_to(ROOT)) for r in recipes for p in sorted(ROOT.glob(r))] if recipes else []
    for recipe in recipes:
        if recipe.startswith(("recipes/", "examples/")):
            assert list(ROOT.glob(recipe)), f"{where}: {recipe} does not exist"
    for recipe in expanded:
        if recipe.startswith("examples/"):
            DEFERRED.append((where, ["validate", recipe, *overrides]))
        else:
            validate_recipe(ROOT / recipe, overrides)


def check_python_script(args: list[str], where: str) -> None:
    script = ROOT / args[0]
    assert script.is_file(), f"{where}: {args[0]} does not exist"
    source = script.read_text(encoding="utf-8")
    for arg in args[1:]:
        if arg.startswith("--"):
            flag = arg.split("=", 1)[0]
            assert f'"{flag}"' in source, f"{where}: {args[0]} has no option {flag}"


def check_pip(args: list[str], where: str) -> None:
    from packaging.requirements import Requirement

    assert args[:1] == ["install"], f"{where}: only `pip install` is documented, got {args}"
    extras_declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for arg in args[1:]:
        if arg.startswith("-"):
            assert arg in ("-e", "-q", "--editable", "-U", "--upgrade"), f"{where}: pip option {arg}"
            continue
        if arg.startswith((".", "/")):
            path, _, extras = arg.partition("[")
            assert (ROOT / path / "pyproject.toml").is_file(), f"{where}: {path} is not a package folder"
            for extra in filter(None, extras.rstrip("]").split(",")):
                assert path != "." or extra in extras_declared, (
                    f"{where}: no extra {extra!r} in pyproject.toml"
                )
        elif "/" in arg:
            assert (ROOT / arg / "pyproject.toml").is_file(), f"{where}: {arg} is not a package folder"
        else:
            Requirement(arg)


def check_shell(code: str, where: str) -> None:
    import click
    from accelerate.commands.launch import launch_command_parser
    from mkdocs.__main__ import cli as mkdocs_cli

    for words in shell_commands(code):
        while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value before a command
            words = words[1:]
        assert words, f"{where}: an assignment alone"
        program, args = words[0], words[1:]
        if program in ("python", "python3", ".venv/bin/python") and args[:1] == ["-m"]:
            program, args = args[1], args[2:]
        if program in ("aaekit", ".venv/bin/aaekit"):
            check_aaekit(args, where)
        elif program == "accelerate":
            assert args[:1] == ["launch"], f"{where}: accelerate {args[:1]}"
            ns = launch_command_parser().parse_args(args[1:])
            assert ns.module and ns.training_script == "aaekit", (
                f"{where}: accelerate launch without -m aaekit"
            )
            check_aaekit(ns.training_script_args, where)
        elif program == "torchrun":
            from torch.distributed.run import get_args_parser

            ns = get_args_parser().parse_args(args)
            assert ns.module and ns.training_script == "aaekit", f"{where}: torchrun without -m aaekit"
            check_aaekit(ns.training_script_args, where)
        elif program in ("python", "python3", ".venv/bin/python"):
            check_python_script(args, where)
        elif program == "pip":
            check_pip(args, where)
        elif program == "mkdocs":
            sub = mkdocs_cli.commands.get(args[0]) if args else None
            assert sub is not None, f"{where}: no command `mkdocs {' '.join(args[:1])}`"
            try:
                sub.make_context(args[0], list(args[1:]))
            except click.ClickException as exc:
                pytest.fail(f"{where}: mkdocs {' '.join(args)}: {exc.format_message()}")
        elif program in (".ci/setup", ".ci/run") or (
            program == "bash" and args[:1] in ([".ci/setup"], [".ci/run"])
        ):
            script = ROOT / (args[0] if program == "bash" else program)
            assert script.is_file() and os.access(script, os.X_OK), f"{where}: {script} is missing"
        elif program == "cp":
            for source in [a for a in args[:-1] if not a.startswith("-")]:
                assert (ROOT / source).exists(), f"{where}: cp from {source}, which does not exist"
        elif program in ("mkdir", "cd", "ls", "git"):
            pass
        else:
            pytest.fail(
                f"{where}: no check for the program {program!r}; teach tests/test_docs.py how to check it"
            )


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory) -> Path:
    """runs/gmm_label and runs/semisupervised_100 in a scratch folder: tiny runs of the shipped recipes."""
    from conftest import tiny_run_args

    home = tmp_path_factory.mktemp("docs-runs")
    for name in ("gmm_label", "semisupervised_100"):
        args = tiny_run_args(
            f"recipes/{name}.toml", home / "runs" / name, "train.pictures=false", "data.validation=0"
        )
        out = aaekit(*args)
        assert out.returncode == 0, out.stderr[-3000:]
    return home


def test_every_code_block_runs_or_is_validated(trained_runs, tmp_path, monkeypatch):
    DEFERRED.clear()
    included: set[str] = set()
    for path in markdown_files():
        namespace: dict = {"__name__": f"docs_{path.stem}"}
        for language, code, line in code_blocks(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            assert language in LANGUAGES, f"{where}: a code block needs a language, one of {LANGUAGES}"
            lines = [c for c in code.strip().splitlines() if c.strip()]
            snippets = [SNIPPET.match(c) for c in lines]
            if any(snippets):
                assert all(snippets), f"{where}: a block that includes a file holds nothing else"
                for m in snippets:
                    target = m.group(1)
                    assert (ROOT / target).is_file() and target.startswith(
                        "examples/aaekit-example-prior/"
                    ), f"{where}: includes {target}, which the suite does not install and run"
                    included.add(target)
                continue
            if language == "toml":
                check_toml(code, where, tmp_path)
            elif language == "bash":
                check_shell(code, where)
            elif language == "python":
                monkeypatch.chdir(trained_runs)
                try:
                    exec(compile(code, where, "exec"), namespace)  # noqa: S102 - the docs' own examples
                finally:
                    monkeypatch.chdir(ROOT)
    assert included == {
        f"examples/aaekit-example-prior/{f}"
        for f in ("aaekit_example_prior.py", "pyproject.toml", "sphere.toml")
    }
    assert DEFERRED, "the tutorial's commands on the example package were not seen"


# ---- the example plugin ------------------------------------------------------------------------------------
def test_the_tutorial_plugin_installs_lists_validates_and_trains(tmp_path):
    site_packages = tmp_path / "site"
    pip = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site_packages),
            str(EXAMPLE),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pip.returncode == 0, pip.stderr[-3000:]
    env = {"PYTHONPATH": str(site_packages)}

    listed = aaekit("plugins", env=env)
    assert listed.returncode == 0, listed.stderr
    line = next(line for line in listed.stdout.splitlines() if " sphere " in line)
    assert "aaekit-example-prior" in line and "0.1.0" in line

    recipe = EXAMPLE / "sphere.toml"
    validate_recipe(recipe, env=env)
    refused = aaekit("validate", str(recipe), "codes.z.dim=1", env=env)
    assert (
        refused.returncode == 2
        and "codes.z.prior.name: sphere needs a code of at least 2 dims" in refused.stderr
    )
    tutorial = (DOCS / "plugins" / "tutorial.md").read_text(encoding="utf-8")
    assert "codes.z.prior.name: sphere needs a code of at least 2 dims, got dim = 1" in tutorial

    for where, args in DEFERRED or [("tutorial", ["validate", "examples/aaekit-example-prior/sphere.toml"])]:
        if "codes.z.dim=1" in args:
            continue
        out = aaekit(*args, env=env)
        assert out.returncode == 0, f"{where}: aaekit {' '.join(args)}:\n{out.stderr[-3000:]}"

    run_dir = tmp_path / "run"
    out = aaekit(
        "run",
        str(recipe),
        *TINY,
        "codes.z.discriminator.hidden=[16]",
        "train.pictures=false",
        "--output-dir",
        str(run_dir),
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run_dir / "model.safetensors").is_file()
    sampled = aaekit("sample", str(run_dir), "-n", "2", "--out", str(tmp_path / "s.png"), env=env)
    assert sampled.returncode == 0, sampled.stderr[-3000:]

    sys.path.insert(0, str(site_packages))
    try:
        import torch
        from aaekit_example_prior import SpherePrior

        prior = SpherePrior(3, radius=2.0, sectors=10)
        labels = torch.arange(10).repeat(20)
        points = prior.sample(200, labels, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(points.norm(dim=1), torch.full((200,), 2.0), atol=1e-5)
        turn = torch.atan2(points[:, 1], points[:, 0]) % (2 * torch.pi) / (2 * torch.pi)
        assert torch.equal((turn * 10).floor().long(), labels)
    finally:
        sys.path.remove(str(site_packages))
        sys.modules.pop("aaekit_example_prior", None)


def test_the_error_messages_the_docs_quote_are_what_aaekit_prints(tmp_path):
    (tmp_path / "recipes").mkdir()
    shipped = (ROOT / "recipes" / "gmm_label.toml").read_text()
    (tmp_path / "recipes" / "x.toml").write_text(shipped.replace('name = "gmm"', 'name = "gmn"'))
    out = aaekit("validate", "recipes/x.toml", cwd=tmp_path)
    started = (DOCS / "getting-started.md").read_text(encoding="utf-8")
    quoted = next(
        code for language, code, _ in code_blocks(DOCS / "getting-started.md") if language == "text"
    )
    assert out.returncode == 2 and out.stderr.strip() == quoted.strip(), (out.stderr, quoted)
    assert "exit status 2" in started

    (tmp_path / "recipes" / "gmm_label.toml").write_text(shipped)
    out = aaekit("validate", "recipes/gmm_label.toml", "train.epochs=0", cwd=tmp_path)
    message = out.stderr.splitlines()[0].removeprefix("error: ")
    assert out.returncode == 2 and " ".join(message.split()) in " ".join(
        (DOCS / "recipes.md").read_text(encoding="utf-8").replace("`", "").split()
    ), message


# ---- the README --------------------------------------------------------------------------------------------
def test_the_readme_is_short_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    assert "## Quick start" in readme and ".ci/setup && .venv/bin/aaekit run recipes/gmm_label.toml" in readme
    assert "bash .ci/run" in readme
    for target in re.findall(r"\]\(([^)\s]+)\)", readme):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        file = ROOT / path
        assert file.exists(), f"README links to {path}, which does not exist"
        if anchor:
            assert anchor in anchors(file), f"README links to {target}: no such heading in {path}"
