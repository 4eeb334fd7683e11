"""Is a change slower? The engine's loop step (next batch + the three phases), before against after.

Each measurement is a fresh process that imports aaekit from one source tree (``PYTHONPATH``), builds the
recipe's Trainer, takes 20 warm-up steps and times the next ``--steps``; the trees alternate, round after
round, so that a shared machine's slow spells fall on both. Make the "before" tree with
``git worktree add /tmp/before <commit>``, then, from the repository root:

    .venv/bin/python benchmarks/step_ab.py /tmp/before . --recipe gaussian --precision bf16 --rounds 4

It prints one JSON object (every measurement) and a short table (medians of the rounds' medians).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs in the measured process: sys.path starts with the tree under test.
MEASURE = r"""
import json, statistics, sys, tempfile, time
import torch
recipe_path, precision, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
import aaekit
from aaekit.engine import Trainer
from aaekit.plugins import get_registry
from aaekit.recipe import load_recipe
registry = get_registry()
recipe = load_recipe(recipe_path, [f"run.mixed_precision={precision}", "train.pictures=false"], registry)
trainer = Trainer(recipe, tempfile.mkdtemp(), registry)
trainer.prepare(None)
trainer.set_epoch_lr(0)
batch = recipe.values["train"]["batch_size"]
# trees from before run.cuda_graphs drew the batch in the loop and the labelled rows inside the step
step = (
    (lambda: trainer.step(*trainer.next_batch()))
    if hasattr(trainer, "next_batch")
    else (lambda: trainer.train_step(trainer.batches.take(batch).to(trainer.device)))
)
times = []
for i in range(steps + 20):
    start = time.perf_counter()
    step()
    if i >= 20:
        times.append(time.perf_counter() - start)
print(json.dumps({"file": aaekit.__file__, "median_ms": 1e3 * statistics.median(times),
                  "min_ms": 1e3 * min(times), "threads": torch.get_num_threads()}))
"""


def measure(tree: Path, recipe: Path, precision: str, steps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("AAEKIT_CACHE_DIR", str(ROOT / ".cache" / "aaekit"))
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(recipe), precision, str(steps)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        sys.exit(f"measuring {tree} failed:\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not Path(result["file"]).resolve().is_relative_to(tree.resolve()):
        sys.exit(f"{tree}: the measured process imported aaekit from {result['file']}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path, help="source tree of the old code (a git worktree)")
    parser.add_argument("after", type=Path, nargs="?", default=ROOT, help="source tree of the new code")
    parser.add_argument("--recipe", default="gaussian", help="a recipe name under recipes/ or a path")
    parser.add_argument("--precision", default="bf16", choices=("no", "bf16"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    opts = parser.parse_args(argv)
    recipe = Path(opts.recipe) if opts.recipe.endswith(".toml") else ROOT / "recipes" / f"{opts.recipe}.toml"
    trees = {"before": opts.before, "after": opts.after}
    rounds = []
    for r in range(opts.rounds):
        order = list(trees) if r % 2 == 0 else list(reversed(trees))
        rounds.append({name: measure(trees[name], recipe, opts.precision, opts.steps) for name in order})
    medians = {name: statistics.median(r[name]["median_ms"] for r in rounds) for name in trees}
    report = {
        "benchmark": "step_ab",
        "recipe": str(recipe.relative_to(ROOT) if recipe.is_relative_to(ROOT) else recipe),
        "precision": opts.precision,
        "steps": opts.steps,
        "trees": {name: str(path) for name, path in trees.items()},
        "rounds": rounds,
        "median_of_round_medians_ms": medians,
        "after_over_before": medians["after"] / medians["before"],
    }
    print(json.dumps(report, indent=1))
    print(f"\n{'round':<7}{'before ms':>11}{'after ms':>10}")
    for i, r in enumerate(rounds):
        print(f"{i:<7}{r['before']['median_ms']:>11.1f}{r['after']['median_ms']:>10.1f}")
    print(
        f"{'median':<7}{medians['before']:>11.1f}{medians['after']:>10.1f}   after/before "
        f"{report['after_over_before']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
