"""Runs load back whatever their data, and every bad input gets one clean answer with nothing lost on disk."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import tomllib
import torch

import aaekit as package
from aaekit.errors import UserError
from conftest import ROOT, TINY, aaekit, aaekit_process, tiny_code_overrides, two_code_recipe

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("*.toml"))


def one_error(out, *fragments: str) -> str:
    """The promise for a user mistake: exit 2, no traceback, exactly one `error:` line naming what is
    wrong."""
    assert out.returncode == 2, (out.returncode, out.stdout[-2000:], out.stderr[-2000:])
    assert "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def tiny_args(recipe: str, run_dir: Path, *extra: str) -> list[str]:
    values = tomllib.loads((ROOT / "recipes" / recipe).read_text())
    tiny = [a for a in TINY if values["data"]["name"] in ("mnist", "hf") or not a.startswith("data.limit")]
    return [
        "run",
        str(ROOT / "recipes" / recipe),
        *tiny,
        *tiny_code_overrides(values),
        "train.pictures=false",
        "data.validation=0",
        *extra,
        "--output-dir",
        str(run_dir),
    ]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- every shipped recipe trains, evaluates, samples and loads back
# -------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_shipped_recipe_loads_back(recipe, tmp_path):
    run_dir = tmp_path / "run"
    out = aaekit(*tiny_args(recipe, run_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((run_dir / "model.json").read_text())

    evaluated = aaekit("eval", str(run_dir), "-n", "40", "--validation-size", "20", "--test-limit", "40")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout)
    latest = aaekit(
        "eval",
        str(run_dir),
        "--checkpoint",
        "latest",
        "-n",
        "40",
        "--validation-size",
        "20",
        "--test-limit",
        "40",
    )
    assert latest.returncode == 0, latest.stderr[-3000:]

    run = package.load(run_dir)
    assert list(run.model.input_shape) == record["input_shape"]
    assert run.model.num_classes == record["num_classes"]
    images = run.sample(3, seed=1)
    assert images.shape == (3, *run.model.input_shape) and torch.isfinite(images).all()
    codes = run.encode(torch.rand(2, *run.model.input_shape))
    assert all(codes[c.name].shape == (2, c.dim) for c in run.model.codes)
    if len(run.model.input_shape) == 2:
        sampled = aaekit("sample", str(run_dir), "-n", "2")
        assert sampled.returncode == 0, sampled.stderr[-3000:]
        assert (run_dir / "sampled.png").stat().st_size > 0
    else:  # a table: no picture, one clear line
        one_error(aaekit("sample", str(run_dir)), "not images")


def test_a_run_on_a_table_loads_without_its_data(tmp_path):
    """The model is rebuilt from the run's model.json, not from the dataset: with the source gone, it
    loads."""
    table = tmp_path / "table.csv"
    table.write_text("a,b,c\n" + "".join(f"{i % 7},{i % 5},{(i * 3) % 11}\n" for i in range(120)))
    run_dir = tmp_path / "run"
    out = aaekit(
        *tiny_args("tabular_example.toml", run_dir, f"data.source={table}", 'data.columns=["a","b","c"]')
    )
    assert out.returncode == 0, out.stderr[-3000:]
    table.unlink()
    run = package.load(run_dir)
    assert run.model.input_shape == (3,)
    assert run.encode(torch.zeros(5, 3))["z"].shape == (5, 2)


# ---- the Python API takes batches shaped like the data or flat
# ----------------------------------------------


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mnist") / "run"
    out = aaekit(*tiny_args("gaussian.toml", run_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


def test_encode_accepts_image_and_flat_batches_and_refuses_others(mnist_run):
    run = package.load(mnist_run)
    images = torch.rand(5, 28, 28)
    by_image = run.encode(images)["z"]
    assert by_image.shape == (5, 8)
    assert torch.equal(run.encode(images.reshape(5, 784))["z"], by_image)
    # one example, either shape (a batch of one may round differently from a batch of five)
    assert torch.allclose(run.encode(images[0])["z"], by_image[:1], atol=1e-5)
    assert torch.allclose(run.encode(images[0].reshape(784))["z"], by_image[:1], atol=1e-5)
    for bad in (torch.rand(5, 783), torch.rand(5, 28, 27), torch.rand(2, 5, 784)):
        with pytest.raises(UserError, match=r"\(N, 28, 28\) or \(N, 784\)"):
            run.encode(bad)


# ---- run folders: a failed start frees its folder, resume rewrites nothing it did not run
# ---------------------


def test_a_run_that_fails_before_training_leaves_its_folder_usable(tmp_path):
    run_dir = tmp_path / "run"
    failed = aaekit(*tiny_args("gaussian.toml", run_dir, f"data.path={tmp_path / 'nowhere'}"))
    one_error(failed, "data.path")
    assert not (run_dir / "recipe.toml").exists()
    one_error(aaekit(*tiny_args("gaussian.toml", run_dir), "--resume"), "holds no run to resume")
    again = aaekit(*tiny_args("gaussian.toml", run_dir))  # the same command, fixed: it runs there
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run_dir / "model.safetensors").is_file()


def test_a_refused_resume_changes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    assert aaekit(*tiny_args("gaussian.toml", run_dir)).returncode == 0
    before = snapshot(run_dir)
    refused = aaekit(*tiny_args("gaussian.toml", run_dir, "codes.z.dim=3"), "--resume")
    assert refused.returncode == 2 and "codes.z.dim" in refused.stderr
    refused = aaekit(*tiny_args("gaussian.toml", run_dir, "data.validation=100000"), "--resume")
    assert refused.returncode == 2
    assert snapshot(run_dir) == before


def test_resuming_from_an_older_checkpoint_keeps_each_metric_step_once(tmp_path):
    run_dir = tmp_path / "run"
    args = tiny_args("gaussian.toml", run_dir, "train.max_steps=8", "train.checkpoint_every=2")
    assert aaekit(*args).returncode == 0
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == [2, 4, 6, 8]
    newest = run_dir / "checkpoints" / "step-00000008"
    (newest / "model.safetensors").write_bytes((newest / "model.safetensors").read_bytes()[:100])
    resumed = aaekit(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "moved to metrics.replaced.jsonl" in resumed.stdout
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == [2, 4, 6, 8]
    replaced = [
        json.loads(line)["step"] for line in (run_dir / "metrics.replaced.jsonl").read_text().splitlines()
    ]
    assert replaced == [8]  # kept, not deleted


# ---- paths that cannot be written
# -----------------------------------------------------------------------------


def test_unwritable_output_paths_are_one_clear_line(tmp_path, mnist_run):
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    one_error(aaekit(*tiny_args("gaussian.toml", a_file / "run")), "is a file, not a folder")
    one_error(aaekit(*tiny_args("gaussian.toml", a_file)), "a file (not a folder) is in the way")
    assert a_file.read_text() == "keep me"
    one_error(
        aaekit(*tiny_args("gaussian.toml", Path("/sys/aaekit-test-run"))), "cannot be created or written"
    )
    one_error(
        aaekit("sample", str(mnist_run), "--out", str(tmp_path / "missing" / "s.png")), "does not exist"
    )
    one_error(aaekit("sample", str(mnist_run), "--out", "/sys/kernel/aaekit-test.png"), "--out")
    one_error(
        aaekit(
            "eval",
            str(mnist_run),
            "-n",
            "20",
            "--test-limit",
            "20",
            "--validation-size",
            "20",
            "--output",
            str(tmp_path / "missing" / "r.json"),
        ),
        "does not exist",
    )


def test_running_out_of_memory_names_the_sizes(tmp_path):
    out = aaekit(*tiny_args("gaussian.toml", tmp_path / "run", "encoder.hidden=[100000000000]"))
    one_error(out, "out of memory", "encoder.hidden = [100000000000]", "train.batch_size = 20")


# ---- recipes: finite numbers, plain run names, overrides named as such
# ----------------------------------------


def test_non_finite_numbers_and_path_like_run_names_are_refused(tmp_path):
    for override, fragment in (
        ("optim.generator.lr=nan", "finite"),
        ("optim.reconstruction.lr=inf", "finite"),
        ("codes.z.prior.std=-inf", "finite"),
        ("run.name=../x", "plain folder name"),
        ('run.name="/tmp/x"', "plain folder name"),
    ):
        out = aaekit(
            "run", str(ROOT / "recipes" / "gaussian.toml"), override, "--output-dir", str(tmp_path / "r")
        )
        one_error(out, f"command-line override {override!r}", fragment)
    assert not (tmp_path / "r").exists()


def test_validate_takes_overrides_and_blames_the_command_line():
    recipe = str(ROOT / "recipes" / "gmm_label.toml")
    ok = aaekit("validate", recipe, "train.epochs=2")
    assert ok.returncode == 0 and f"ok: {recipe}" in ok.stdout
    one_error(
        aaekit("validate", recipe, "train.epoch=3"),
        "command-line override 'train.epoch=3'",
        "did you mean 'epochs'",
    )
    one_error(aaekit("run", recipe, "train.epoch=3"), "command-line override 'train.epoch=3'")


# ---- plugins: wrong shapes, broken imports, one-off plugin folders
# ------------------------------------------

WIDE_PRIOR = '''
import torch
from aaekit.contracts import Prior
from aaekit.hookspecs import hookimpl
from aaekit.params import Param


class WidePrior(Prior):
    """Returns one column too many."""
    name = "wide"
    params = {"std": Param(float, 1.0)}

    def sample(self, n, labels=None, *, generator=None, device="cpu"):
        return torch.randn((n, self.dim + 1), generator=generator, device=device)


@hookimpl
def register_priors(register):
    register(WidePrior)
'''

SHIFTED_PRIOR = (
    WIDE_PRIOR.replace("WidePrior", "ShiftedPrior")
    .replace('"wide"', '"shifted"')
    .replace("self.dim + 1", "self.dim")
    .replace("Returns one column too many.", "N(3, I).")
    .replace("device=device)", "device=device) + 3")
)


def plugin_folder(tmp_path: Path, file_name: str, source: str) -> Path:
    """A folder for --plugins-dir holding one plugin file."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / file_name).write_text(source)
    return folder


def test_a_prior_returning_the_wrong_shape_is_named_before_training(tmp_path):
    plugins = plugin_folder(tmp_path, "wide_prior.py", WIDE_PRIOR)
    run_dir = tmp_path / "run"
    out = aaekit(
        *tiny_args("gaussian.toml", run_dir, "codes.z.prior.name=wide"), "--plugins-dir", str(plugins)
    )
    one_error(out, "codes.z.prior", "'wide'", "wide_prior.py", "(4, 9)", "expected (4, 8)")
    assert not (run_dir / "metrics.jsonl").exists()


def test_a_broken_plugin_is_named_at_run_and_when_a_recipe_needs_it(tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "broken_prior.py").write_text("import no_such_module_for_aaekit\n")
    recipe = str(ROOT / "recipes" / "gaussian.toml")
    out = aaekit("validate", recipe, "--plugins-dir", str(plugins))
    warnings = [line for line in out.stderr.splitlines() if line.startswith("warning:")]
    assert out.returncode == 0 and len(warnings) == 1 and "broken_prior.py" in warnings[0], out.stderr
    assert "no_such_module_for_aaekit" in warnings[0]
    out = aaekit("run", recipe, "codes.z.prior.name=broken", "--plugins-dir", str(plugins))
    one_error(out, "unknown prior 'broken'", "broken_prior.py", "No module named 'no_such_module_for_aaekit'")


def test_a_run_trained_with_a_plugins_dir_evaluates_without_it_and_says_when_it_is_gone(tmp_path):
    plugins = plugin_folder(tmp_path, "shifted_prior.py", SHIFTED_PRIOR)
    run_dir = tmp_path / "run"
    out = aaekit(
        *tiny_args("gaussian.toml", run_dir, "codes.z.prior.name=shifted"), "--plugins-dir", str(plugins)
    )
    assert out.returncode == 0, out.stderr[-3000:]
    evaluated = aaekit("eval", str(run_dir), "-n", "20", "--test-limit", "20", "--validation-size", "20")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    plugins.rename(tmp_path / "moved")
    one_error(
        aaekit("sample", str(run_dir)), "codes.z.prior = prior 'shifted'", "--plugins-dir", str(plugins)
    )


# ---- preemption, threads, logs that are not a terminal
# -------------------------------------------------------


def test_sigterm_checkpoints_at_the_next_log_step_and_prints_the_resume_command(tmp_path):
    recipe = two_code_recipe(
        tmp_path / "semi.toml",
        data={"limit": 400, "labelled": 60},
        train={"batch_size": 20, "max_steps": 16, "log_every": 4, "checkpoint_every": 0},
    )
    run_dir = tmp_path / "run"
    out = aaekit_process(
        "run",
        str(recipe),
        "--output-dir",
        str(run_dir),
        env={"AAEKIT_TEST_SIGNAL_AT": "SIGTERM:6", **ONE_THREAD},
    )
    assert out.returncode == 128 + signal.SIGTERM, out.stderr[-3000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-00000008"]
    command = out.stderr.split("continue with: ", 1)[1].split()
    assert command[:2] == ["aaekit", "run"] and "--resume" in command
    resumed = aaekit_process(*command[1:], env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == [4, 8, 12, 16]


def test_the_thread_count_is_printed_and_settable_and_logs_get_plain_lines(tmp_path):
    before = torch.get_num_threads()
    out = aaekit(*tiny_args("gaussian.toml", tmp_path / "run", "run.threads=1"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "cpu: 1 thread(s) per process" in out.stdout
    assert torch.get_num_threads() == before  # the caller's setting is given back
    lines = [line for line in out.stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"], out.stdout
    assert all("reconstruction" in line and "samples/s" in line and "left" in line for line in lines)


def test_a_loss_that_explodes_without_reaching_inf_is_warned_about_at_the_end(tmp_path):
    # Adam at lr 1000 on a linear decoder: squared errors near 1e31, finite in fp32, so the run completes
    out = aaekit(
        *tiny_args(
            "gaussian.toml",
            tmp_path / "run",
            "train.max_steps=6",
            "decoder.output=linear",
            "decoder.loss=mse",
            "optim.reconstruction.lr=1000",
        )
    )
    assert out.returncode == 0, out.stderr[-3000:]
    warnings = [
        line for line in out.stdout.splitlines() if line.startswith("warning: loss/reconstruction reached")
    ]
    # when it happens, and again at the end
    assert len(warnings) == 2 and "diverging" in warnings[0], out.stdout
    assert out.stdout.rstrip().splitlines()[-1].startswith("run written to")
    assert out.stdout.rindex(warnings[1]) > out.stdout.index("step 6/6")
