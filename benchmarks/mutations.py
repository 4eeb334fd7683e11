"""Mutation check: break a promised feature on purpose, in a copy of the source, and see whether the tests
that stand behind the promise fail ("killed") or still pass ("survived").

    .venv/bin/python benchmarks/mutations.py                      # every mutation below
    .venv/bin/python benchmarks/mutations.py --only cli-second-line --only cli-error-twice   # some of them
    .venv/bin/python benchmarks/mutations.py --list               # names, files and tests, nothing run
    .venv/bin/python benchmarks/mutations.py --json out.json      # also write the JSON report to a file

Each mutation is (name, file, exact source snippet, replacement, tests). For each one the checkout (source,
plugins, tests, recipes, benchmarks, docs; not .git, .venv, caches or runs) is copied into a fresh temporary
folder, beside a link to ``../shared`` so that MNIST is found as from the checkout; the snippet is replaced
there (it must occur exactly once: a snippet that moved fails loudly before anything runs), and the named
tests run with pytest from the copy, the copy's packages first on ``PYTHONPATH`` (checked: a subprocess must
import ``aaekit`` and ``aaekit_builtins`` from the copy, or the mutation is reported as an error). The
checkout itself is never changed. Before the mutations, the same tests run once on an unmutated copy: a test
that fails there would "kill" every mutation for nothing, so the script stops.

The copies share one cache folder of their own (``AAEKIT_CACHE_DIR``, seeded with the checkout's decoded
MNIST), so a mutated kernel source never replaces the checkout's compiled loops.

Output: a JSON list (one object per mutation: name, file, status killed / survived / error, the tests, the
failing test ids, seconds) on stdout, then a short table. Exit status 0 when every mutation was killed, 1
otherwise. Add an entry here with each change that makes a promise, naming the tests that keep it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Everything at the top of the checkout is copied but these (the environment, caches, runs, build outputs)
NOT_COPIED = {".git", ".venv", ".cache", "runs", "build", "dist", ".pytest_cache", ".ruff_cache", "site"}
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".pytest_cache", "results")


@dataclass
class Mutation:
    name: str
    file: str  # relative to the repository root
    snippet: str  # exact text, found exactly once in the file
    replacement: str
    tests: list[str]  # pytest node ids relative to the repository root
    what: str = ""
    extra: list[tuple[str, str, str]] = field(default_factory=list)  # further (file, snippet, replacement)

    def edits(self) -> list[tuple[str, str, str]]:
        return [(self.file, self.snippet, self.replacement), *self.extra]


T_DIST = "tests/test_distributed.py"
T_API = "tests/test_api.py"
T_CLI = "tests/test_cli.py"

MUTATIONS = [
    # ---- 1. bf16 master weights --------------------------------------------------------------------------
    Mutation(
        "master-step-skips-bf16-weights",
        "aaekit/cpu/master_weights.py",
        "            if low and not self.fast_update(group, low):",
        "            if False and low and not self.fast_update(group, low):",
        [f"{T_DIST}::test_bf16_trains_close_to_fp32"],
        "MasterOptimizer.step never updates the bf16 weights (nor their masters)",
    ),
    Mutation(
        "master-kernel-leaves-bf16-weights",
        "aaekit/cpu/master_weights.c",
        "        w[k] = wk;\n        out[k] = float_to_bf16(wk);\n    }\n}\n\n/* One optimizer step",
        "        w[k] = wk;\n    }\n}\n\n/* One optimizer step",
        [f"{T_DIST}::test_bf16_trains_close_to_fp32"],
        "the compiled Adam loop updates the fp32 masters but never writes the bf16 weights the layers "
        "compute with",
    ),
    Mutation(
        "master-adam-tenth-of-the-rate",
        "aaekit/cpu/master_weights.py",
        '            steps,\n            group["lr"],\n            beta1,\n',
        '            steps,\n            0.1 * group["lr"],\n            beta1,\n',
        [f"{T_DIST}::test_bf16_trains_close_to_fp32"],
        "the compiled Adam loop steps the bf16 weights with a tenth of the learning rate",
    ),
    # ---- 2. label-conditional sampling -------------------------------------------------------------------
    Mutation(
        "prior-codes-ignore-labels",
        "aaekit/model.py",
        "                if labels is not None and prior.num_components == self.num_classes:\n"
        "                    components = labels\n",
        "                if labels is not None and prior.num_components == self.num_classes:\n"
        "                    components = torch.randint(prior.num_components, (n,), generator=generator,"
        " device=device)\n",
        [
            f"{T_API}::test_sample_labels_land_on_their_component",
            f"{T_API}::test_sample_and_interpolate_pngs_are_the_decoded_draws_of_the_labels",
            f"{T_API}::test_load_round_trip_matches_the_trained_model",
            "tests/test_pictures.py::test_gmm_label_run_writes_the_three_pictures",
        ],
        "prior_codes draws a random component instead of the label's",
    ),
    Mutation(
        "prior-codes-labels-off-by-one",
        "aaekit/model.py",
        "                    components = labels\n",
        "                    components = (labels + 1) % prior.num_components\n",
        [f"{T_API}::test_sample_labels_land_on_their_component"],
        "prior_codes draws from the next component",
    ),
    Mutation(
        "interpolate-end-ignores-labels",
        "aaekit/api.py",
        "        end, _ = self.model.prior_codes(n, labels, generator)",
        "        end, _ = self.model.prior_codes(n, None, generator)",
        [f"{T_API}::test_interpolation_walks_between_draws_of_the_rows_label"],
        "an interpolation's end point ignores the row's label",
    ),
    Mutation(
        "sample-grid-rows-are-labels",
        "aaekit/pictures/sampling.py",
        "        column_labels = torch.tensor(labels).repeat(rows)",
        "        column_labels = torch.tensor(labels).repeat_interleave(rows)",
        [f"{T_API}::test_sample_and_interpolate_pngs_are_the_decoded_draws_of_the_labels"],
        "`aaekit sample --labels` puts the labels along the rows instead of one per column",
    ),
    Mutation(
        "samples-png-rows-are-components",
        "aaekit/pictures/__init__.py",
        "        labels = torch.arange(k, device=trainer.device).repeat(10)",
        "        labels = torch.arange(k, device=trainer.device).repeat_interleave(10)",
        ["tests/test_pictures.py::test_gmm_label_run_writes_the_three_pictures"],
        "samples.png puts one component per row instead of one per column",
    ),
    # ---- 3. one readable line per user error -------------------------------------------------------------
    Mutation(
        "cli-second-line",
        "aaekit/cli.py",
        '        except UserError as exc:\n            click.echo(f"error: {exc}", err=True)\n',
        '        except UserError as exc:\n            click.echo(f"error: {exc}", err=True)\n'
        '            click.echo("(run with --help for usage)", err=True)\n',
        [f"{T_CLI}::test_user_mistakes_exit_2_without_traceback"],
        "a user error prints a second line",
    ),
    Mutation(
        "cli-error-twice",
        "aaekit/cli.py",
        '        except UserError as exc:\n            click.echo(f"error: {exc}", err=True)\n',
        '        except UserError as exc:\n            click.echo(f"error: {exc}", err=True)\n'
        '            click.echo(f"error: {exc}", err=True)\n',
        [f"{T_CLI}::test_user_mistakes_exit_2_without_traceback"],
        "a user error is printed twice",
    ),
    Mutation(
        "cli-recipe-error-extra-line",
        "aaekit/cli.py",
        '            for line in exc.problems:\n                click.echo(f"error: {line}", err=True)\n',
        '            for line in exc.problems:\n                click.echo(f"error: {line}", err=True)\n'
        '                click.echo("  (see the recipe reference in README.md)", err=True)\n',
        [f"{T_CLI}::test_user_mistakes_exit_2_without_traceback"],
        "each recipe problem is followed by a hint line",
    ),
    Mutation(
        "cli-user-error-exit-1",
        "aaekit/cli.py",
        '            click.echo(f"error: {exc}", err=True)\n            sys.exit(2)',
        '            click.echo(f"error: {exc}", err=True)\n            sys.exit(1)',
        [f"{T_CLI}::test_user_mistakes_exit_2_without_traceback"],
        "a user error exits with status 1",
    ),
    # ---- 4. the Gaussian posterior -----------------------------------------------------------------------
    Mutation(
        "gaussian-posterior-mean-while-training",
        "plugins/aaekit-builtins/aaekit_builtins/posteriors.py",
        "        if not self.training:\n            return mean\n",
        "        return mean\n",
        [
            f"{T_API}::test_gaussian_posterior_samples_while_training_and_gives_its_mean_when_evaluating",
            "tests/test_training.py::test_gaussian_posterior_trains_on_sampled_codes",
        ],
        "the Gaussian posterior returns its mean while training",
    ),
    Mutation(
        "gaussian-posterior-std-is-the-variance",
        "plugins/aaekit-builtins/aaekit_builtins/posteriors.py",
        "        std = torch.exp(0.5 * logvar.clamp(min=self.min_logvar))",
        "        std = torch.exp(logvar.clamp(min=self.min_logvar))",
        [f"{T_API}::test_gaussian_posterior_samples_while_training_and_gives_its_mean_when_evaluating"],
        "the Gaussian posterior's noise has the variance as its standard deviation",
    ),
    Mutation(
        "gaussian-posterior-samples-when-evaluating",
        "plugins/aaekit-builtins/aaekit_builtins/posteriors.py",
        "        if not self.training:\n            return mean\n",
        "",
        [f"{T_API}::test_gaussian_posterior_samples_while_training_and_gives_its_mean_when_evaluating"],
        "the Gaussian posterior samples when evaluating too",
    ),
    Mutation(
        "gaussian-posterior-global-rng",
        "plugins/aaekit-builtins/aaekit_builtins/posteriors.py",
        "        return mean + std * torch.randn(mean.shape, generator=generator, device=mean.device,"
        " dtype=mean.dtype)",
        "        return mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)",
        [f"{T_API}::test_gaussian_posterior_samples_while_training_and_gives_its_mean_when_evaluating"],
        "the Gaussian posterior draws from torch's global RNG instead of the run's noise stream",
    ),
    # ---- the other weak tests ----------------------------------------------------------------------------
    Mutation(
        "plugins-load-at-import",
        "aaekit/plugins.py",
        "    registry.components[kind][name] = Registered(kind, name, cls, plugin, dist, version)\n",
        "    registry.components[kind][name] = Registered(kind, name, cls, plugin, dist, version)\n\n\n"
        "get_registry()\n",
        ["tests/test_plugins.py::test_loading_is_lazy_and_once"],
        "every plugin is loaded when aaekit.plugins is imported",
    ),
    Mutation(
        "plugins-load-every-time",
        "aaekit/plugins.py",
        "    if _registry is None or dirs != _loaded_dirs:",
        "    if True:",
        ["tests/test_plugins.py::test_loading_is_lazy_and_once"],
        "get_registry loads every plugin again on each call",
    ),
    Mutation(
        "throughput-counts-children-twice",
        "benchmarks/throughput.py",
        "        ms[category_of(event)] += event.self_cpu_time_total / 1e3",
        "        ms[category_of(event)] += event.cpu_time_total / 1e3",
        ["tests/test_benchmarks.py::test_throughput_quick_writes_every_figure"],
        "the time breakdown counts an operator's children in its own time as well",
    ),
    Mutation(
        "clusters-png-rows-shifted",
        "aaekit/pictures/modes.py",
        "        members = (assigned == cluster).nonzero().flatten()[:per_row]",
        "        members = (assigned == (cluster + 1) % spec.dim).nonzero().flatten()[:per_row]",
        ["tests/test_clustering.py::test_cluster16_recipe_runs_and_draws_one_row_per_cluster"],
        "clusters.png shows each cluster's images in the row of the cluster before it",
    ),
    Mutation(
        "style-png-one-label-per-row",
        "aaekit/pictures/modes.py",
        "    labels = torch.arange(k, device=device).repeat(rows)",
        "    labels = torch.arange(k, device=device).repeat_interleave(rows)",
        ["tests/test_semisupervised.py::test_supervised_run_writes_the_style_grid"],
        "style.png decodes one label per row instead of every class along each row",
    ),
    Mutation(
        "style-png-new-z-per-image",
        "aaekit/pictures/modes.py",
        "    codes = {name: v.repeat_interleave(k, dim=0) for name, v in codes.items()}",
        "    codes, _ = model.prior_codes(rows * k, None, generator)",
        ["tests/test_semisupervised.py::test_supervised_run_writes_the_style_grid"],
        "style.png draws a new z for every image instead of one per row",
    ),
    # ---- promises that had no test -----------------------------------------------------------------------
    Mutation(
        "resume-every-rank-takes-rank0-noise",
        "aaekit/checkpoint.py",
        '    key = f"noise.rank{acc.process_index}"',
        '    key = "noise.rank0"',
        [f"{T_DIST}::test_two_ranks_killed_and_resumed_end_bitwise_identical"],
        "a resumed rank continues rank 0's noise stream instead of its own",
    ),
    Mutation(
        "resume-other-world-size-refused",
        "aaekit/checkpoint.py",
        "        acc.print(\n"
        "            f\"note: checkpoint was written by {state.get('world_size')} processes, resuming on \"\n"
        '            f"{acc.num_processes}; the noise streams restart per rank"\n'
        "        )\n",
        "        raise UserError(\n"
        "            f\"{checkpoint.path}: written by {state.get('world_size')} processes; resume on \"\n"
        '            "as many"\n'
        "        )\n",
        [f"{T_DIST}::test_resuming_on_another_number_of_processes"],
        "a checkpoint resumes only on the number of processes that wrote it",
    ),
    Mutation(
        "second-ctrl-c-ignored",
        "aaekit/stopping.py",
        "        if self.requested is not None:\n            raise StopAtOnce(signum)\n",
        "        if self.requested is not None:\n            return\n",
        [f"{T_DIST}::test_ctrl_c_twice_stops_at_once_and_keeps_the_last_checkpoint"],
        "a second Ctrl-C waits for the next log step like the first",
    ),
    Mutation(
        "weights-fall-back-to-torch-load",
        "aaekit/checkpoint.py",
        "    try:\n        return load_file(str(path))\n",
        "    try:\n        try:\n            return load_file(str(path))\n        except Exception:\n"
        '            with open(path, "rb") as fh:  # a file: torch.load reads a .safetensors path as '
        "safetensors\n"
        "                return torch.load(fh, weights_only=False)\n",
        ["tests/test_untrusted_files.py"],
        "a weights file that is not safetensors is unpickled",
    ),
    Mutation(
        "overrides-evaluated",
        "aaekit/recipe.py",
        "    except tomllib.TOMLDecodeError:\n        parsed = raw\n",
        "    except tomllib.TOMLDecodeError:\n        parsed = eval(raw)\n",
        ["tests/test_untrusted_files.py"],
        "an override that is not a TOML value is evaluated as Python",
    ),
]


# ---------------------------------------------------------------------------------------------------------


def check_snippets(mutations: list[Mutation]) -> None:
    """Every snippet must occur exactly once in the checkout's file; otherwise stop before running
    anything."""
    problems = []
    for m in mutations:
        for file, snippet, _ in m.edits():
            path = ROOT / file
            if not path.is_file():
                problems.append(f"{m.name}: {file}: no such file")
                continue
            count = path.read_text(encoding="utf-8").count(snippet)
            if count != 1:
                problems.append(
                    f"{m.name}: {file}: the snippet occurs {count} times (expected once); the source "
                    f"moved, update the entry:\n{snippet}"
                )
    if problems:
        sys.exit("mutations.py: " + "\n".join(problems))


def make_copy(parent: Path) -> Path:
    copy = parent / ROOT.name
    copy.mkdir()
    for src in sorted(ROOT.iterdir()):
        if src.name in NOT_COPIED or src.name.endswith(".egg-info"):
            continue
        if src.is_dir():
            shutil.copytree(src, copy / src.name, ignore=IGNORED)
        elif src.is_file():
            shutil.copy2(src, copy / src.name)
    shared = ROOT.parent / "shared"
    if shared.exists():  # MNIST is looked up at ../shared/data/mnist, as from the checkout
        (parent / "shared").symlink_to(shared, target_is_directory=True)
    return copy


def apply(copy: Path, m: Mutation) -> None:
    for file, snippet, replacement in m.edits():
        path = copy / file
        text = path.read_text(encoding="utf-8")
        if text.count(snippet) != 1:
            raise RuntimeError(f"{m.name}: {file}: snippet not found exactly once in the copy")
        path.write_text(text.replace(snippet, replacement), encoding="utf-8")


def environment(copy: Path, cache: Path) -> dict:
    paths = [str(copy), str(copy / "plugins" / "aaekit-builtins")]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["AAEKIT_CACHE_DIR"] = str(cache)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.pop("AAEKIT_PLUGINS_DIR", None)
    return env


IMPORT_CHECK = "import aaekit, aaekit_builtins; print(aaekit.__file__); print(aaekit_builtins.__file__)"


def imports_the_copy(copy: Path, env: dict) -> str | None:
    """None when a fresh interpreter imports both packages from the copy; else what it imported."""
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_CHECK], cwd=copy, env=env, capture_output=True, text=True, check=False
    )
    files = out.stdout.split()
    if out.returncode != 0 or len(files) != 2:
        return f"import failed: {out.stderr[-500:]}"
    if not all(Path(f).resolve().is_relative_to(copy.resolve()) for f in files):
        return f"imported {files}, not the copy under {copy}"
    return None


def failing_tests(output: str) -> list[str]:
    return sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)))


def run_tests(
    copy: Path, env: dict, tests: list[str], timeout: int, pytest_args: list[str]
) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args, *tests]
    try:
        out = subprocess.run(
            cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        return -1, f"timed out after {timeout} s\n{exc.stdout or ''}"
    return out.returncode, out.stdout + out.stderr


def trial(
    m: Mutation | None,
    tests: list[str],
    cache: Path,
    timeout: int,
    pytest_args: list[str],
    show_output: bool = False,
) -> dict:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="aaekit-mutation-") as tmp:
        copy = make_copy(Path(tmp))
        if m is not None:
            apply(copy, m)
        env = environment(copy, cache)
        problem = imports_the_copy(copy, env)
        if problem:
            code, output = None, problem
        else:
            code, output = run_tests(copy, env, tests, timeout, pytest_args)
    # pytest: 0 all passed, 1 some failed; anything else (interrupted, usage error, nothing collected) is
    # an error
    status = {0: "survived", 1: "killed"}.get(code, "error")
    return {
        "name": m.name if m else "baseline",
        "file": m.file if m else None,
        "what": m.what if m else "",
        "status": status,
        "returncode": code,
        "tests": tests,
        "failed": failing_tests(output),
        "seconds": round(time.monotonic() - started, 1),
        "output_tail": output[-3000:] if status == "error" or show_output else "",
    }


def seed_cache(cache: Path) -> None:
    """The copies' own cache, with the checkout's decoded MNIST (decoding it again takes a while)."""
    checkout_cache = Path(os.environ.get("AAEKIT_CACHE_DIR") or ROOT / ".cache" / "aaekit")
    if (checkout_cache / "mnist").is_dir() and not (cache / "mnist").exists():
        shutil.copytree(checkout_cache / "mnist", cache / "mnist")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[], help="run only this mutation (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the run of the tests on unmutated code"
    )
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per pytest run (default 1200)")
    parser.add_argument("--json", type=Path, help="also write the JSON report to this file")
    parser.add_argument(
        "--pytest-arg", action="append", default=[], help="extra argument for pytest (repeatable)"
    )
    parser.add_argument(
        "--show-output", action="store_true", help="keep the tail of pytest's output of every run"
    )
    args = parser.parse_args(argv)

    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    unknown = set(args.only) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutation(s): {', '.join(sorted(unknown))}")
    check_snippets(chosen)
    if args.list:
        for m in chosen:
            print(f"{m.name:<44} {m.file}\n    {m.what}\n    " + "\n    ".join(m.tests))
        return 0

    results = []
    with tempfile.TemporaryDirectory(prefix="aaekit-mutation-cache-") as cache_dir:
        cache = Path(cache_dir)
        seed_cache(cache)
        if not args.no_baseline:
            tests = list(dict.fromkeys(t for m in chosen for t in m.tests))
            print(
                f"baseline: {len(tests)} test target(s) on the unmutated copy ...",
                file=sys.stderr,
                flush=True,
            )
            base = trial(None, tests, cache, args.timeout, args.pytest_arg)
            if base["status"] != "survived":
                print(json.dumps(base, indent=1))
                print("the tests fail (or error) without any mutation; fix them first", file=sys.stderr)
                return 2
        for m in chosen:
            print(f"{m.name} ...", file=sys.stderr, flush=True)
            results.append(trial(m, m.tests, cache, args.timeout, args.pytest_arg, args.show_output))
            print(f"  {results[-1]['status']} ({results[-1]['seconds']} s)", file=sys.stderr, flush=True)

    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    print(f"\n{'mutation':<44} {'status':<9} {'s':>6}  failing tests")
    for r in results:
        print(f"{r['name']:<44} {r['status']:<9} {r['seconds']:>6}  {', '.join(r['failed'])[:120]}")
    counts = {s: sum(r["status"] == s for r in results) for s in ("killed", "survived", "error")}
    print(
        f"\n{counts['killed']} killed, {counts['survived']} survived, {counts['error']} errors "
        f"of {len(results)} mutations"
    )
    return 0 if counts["killed"] == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
