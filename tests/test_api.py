"""aaekit.load, aaekit sample and aaekit eval on real (tiny) trained runs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers_promises import as_grid, component_of, decoder_inputs, far_from_centre, read_grid, same_picture
from safetensors.torch import load_file

import aaekit
from aaekit.errors import UserError
from conftest import TINY, tiny_run_args, two_code_recipe
from conftest import aaekit as run_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-code semi-supervised model trained in-process; the trainer's own outputs are the reference."""
    from aaekit.engine import Trainer
    from aaekit.plugins import get_registry
    from aaekit.recipe import load_recipe

    tmp = tmp_path_factory.mktemp("api")
    two_code_recipe(
        tmp / "semi.toml",
        run={"name": "api_semi", "seed": 3},
        data={"name": "mnist", "labelled": 100},
        encoder={"name": "gaussian", "hidden": [32]},
        decoder={"hidden": [32], "output": "sigmoid", "loss": "bce"},
    )
    registry = get_registry()
    recipe = load_recipe(
        tmp / "semi.toml", [o for o in TINY if not o.startswith(("encoder.", "decoder."))], registry
    )
    run_dir = tmp / "run"
    run_dir.mkdir()
    (run_dir / "recipe.toml").write_text(recipe.dumps())
    trainer = Trainer(recipe, run_dir, registry)
    trainer.prepare(None)
    trainer.fit()
    model = trainer.model.eval()
    x = torch.rand(6, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        codes = model.encoder(x.reshape(6, -1))
        decoded = model.to_data_space(model.decoder(model.decoder_input(codes, None)).float())
        sampled = model.sample(5, torch.tensor([0, 1, 2, 3, 4]), torch.Generator().manual_seed(7))
    return run_dir, {
        "x": x,
        "codes": codes,
        "decoded": decoded.reshape(6, 28, 28),
        "sampled": sampled,
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def test_load_round_trip_matches_the_trained_model(trained):
    run_dir, ref = trained
    run = aaekit.load(run_dir)
    state = run.model.state_dict()
    assert set(state) == set(ref["state"])
    assert all(torch.equal(state[k], ref["state"][k]) for k in state)
    codes = run.encode(ref["x"])
    torch.testing.assert_close(codes["z"], ref["codes"]["z"], rtol=0, atol=0)
    torch.testing.assert_close(codes["y"], ref["codes"]["y"], rtol=0, atol=0)
    torch.testing.assert_close(run.decode({"z": codes["z"], "y": codes["y"]}), ref["decoded"], rtol=0, atol=0)
    torch.testing.assert_close(run.classify(ref["x"]), ref["codes"]["y"].argmax(1))
    with decoder_inputs(10 + 2) as seen:  # y, z
        sampled = run.sample(5, labels=[0, 1, 2, 3, 4], seed=7)
    torch.testing.assert_close(sampled, ref["sampled"], rtol=0, atol=0)
    # and what both sampled is the labels' own: y is their one-hot (the categorical prior's component per
    # class)
    assert torch.equal(seen[0][:, :10], torch.eye(10)[:5])
    # uint8 pixels are scaled as in training
    pixels = (ref["x"] * 255).round().to(torch.uint8)
    torch.testing.assert_close(run.encode(pixels)["z"], run.encode(pixels.float() / 255)["z"])


def test_load_errors_are_clear(trained, tmp_path):
    run_dir, _ = trained
    with pytest.raises(UserError, match="no such run directory"):
        aaekit.load(tmp_path / "nowhere")
    with pytest.raises(UserError, match="decode a dict"):
        aaekit.load(run_dir).decode(torch.zeros(2, 2))
    with pytest.raises(UserError, match="label 12 is out of range"):
        aaekit.load(run_dir).sample(2, labels=[1, 12])
    with pytest.raises(UserError, match="no categorical code"):
        _classify_without_categorical_code(run_dir)

    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    (broken / "model.safetensors").write_bytes((run_dir / "model.safetensors").read_bytes()[:500])
    with pytest.raises(UserError, match="corrupt or unreadable safetensors"):
        aaekit.load(broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(UserError, match="model.safetensors: missing"):
        aaekit.load(broken)
    (broken / "recipe.toml").unlink()
    with pytest.raises(UserError, match="recipe.toml: missing"):
        aaekit.load(broken)


def _classify_without_categorical_code(run_dir):
    """The same model with its categorical code removed from the code list refuses to classify."""
    run = aaekit.load(run_dir)
    run.model.codes = [c for c in run.model.codes if c.kind != "categorical"]
    run.classify(torch.zeros(1, 28, 28))


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """gmm_label through the CLI: bf16 mixed precision, a prior whose components are the classes."""
    run_dir = tmp_path_factory.mktemp("cli") / "gmm"
    result = run_cli(*tiny_run_args("recipes/gmm_label.toml", run_dir, "train.pictures=false"))
    assert result.returncode == 0, result.stderr
    return run_dir


def test_bf16_run_loads_with_fp32_weights(cli_run):
    run = aaekit.load(cli_run)
    assert run.recipe.values["run"]["mixed_precision"] == "bf16"
    assert all(p.dtype == torch.float32 for p in run.model.parameters())
    images = run.sample(4, labels=[0, 1, 2, 3], seed=0)
    assert images.shape == (4, 28, 28) and 0 <= images.min() and images.max() <= 1


def test_sample_writes_png_of_the_right_size_and_never_overwrites(cli_run, tmp_path):
    import matplotlib.pyplot as plt

    out = tmp_path / "grid.png"
    result = run_cli("sample", str(cli_run), "-n", "3", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert plt.imread(out).shape[:2] == (3 * 28, 10 * 28)  # one column per class of the GMM prior

    before = out.read_bytes()
    again = run_cli("sample", str(cli_run), "--labels", "1,2", "--out", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    assert out.read_bytes() == before
    forced = run_cli("sample", str(cli_run), "--labels", "1,2", "-n", "4", "--out", str(out), "--force")
    assert forced.returncode == 0, forced.stderr
    assert plt.imread(out).shape[:2] == (4 * 28, 2 * 28)

    walk = tmp_path / "walk.png"
    result = run_cli("sample", str(cli_run), "--interpolate", "-n", "2", "--steps", "5", "--out", str(walk))
    assert result.returncode == 0, result.stderr
    assert plt.imread(walk).shape[:2] == (2 * 28, 5 * 28)


def test_sample_labels_land_on_their_component(cli_run):
    """gmm_label's prior has one arm per class: sample(n, labels=...) decodes draws of each row's own arm (the
    decoder's input is observed, nothing replaced); one label serves every row; without labels, every arm."""
    run = aaekit.load(cli_run)
    labels = torch.arange(10).repeat(30)
    with decoder_inputs(2) as seen:
        images = run.sample(300, labels=labels, seed=1)
        run.sample(100, labels=3, seed=2)
        run.sample(300, seed=3)
    per_row, one_label, unlabelled = seen
    far = far_from_centre(per_row)
    assert far.sum() > 200
    assert torch.equal(component_of(per_row)[far], labels[far])
    assert set(component_of(one_label)[far_from_centre(one_label)].tolist()) == {3}
    assert set(component_of(unlabelled)[far_from_centre(unlabelled)].tolist()) == set(range(10))
    # the images are the decoded draws themselves
    torch.testing.assert_close(images, run.decode(per_row), rtol=0, atol=1e-6)


def test_interpolation_walks_between_draws_of_the_rows_label(cli_run):
    """interpolate(n, steps, labels): row i walks in a straight line, in even steps, between two draws of
    label i's arm, and the images are those points decoded."""
    run = aaekit.load(cli_run)
    labels = torch.arange(10).repeat(3)
    with decoder_inputs(2) as seen:
        walks = run.interpolate(30, steps=5, labels=labels, seed=4)
    (points,) = seen
    points = points.reshape(30, 5, 2)
    assert walks.shape == (30, 5, 28, 28)
    for end in (points[:, 0], points[:, -1]):
        far = far_from_centre(end)
        assert far.sum() > 20
        assert torch.equal(component_of(end)[far], labels[far])
    assert not torch.allclose(points[:, 0], points[:, -1])  # two draws, not one
    t = torch.linspace(0, 1, 5).view(1, 5, 1)
    torch.testing.assert_close(points, torch.lerp(points[:, :1], points[:, -1:], t), rtol=0, atol=1e-5)
    decoded = run.decode(points.reshape(150, 2))
    torch.testing.assert_close(walks.reshape(150, 28, 28), decoded, rtol=0, atol=1e-6)


def test_sample_and_interpolate_pngs_are_the_decoded_draws_of_the_labels(cli_run, tmp_path):
    """`aaekit sample --labels 3,7`: column j holds draws of label j's arm, decoded; `--interpolate --labels`:
    row i walks between two draws of the i-th label (cycled)."""
    run = aaekit.load(cli_run)
    out = tmp_path / "labels.png"
    with decoder_inputs(2) as seen:
        result = run_cli(
            "sample", str(cli_run), "--labels", "3,7", "-n", "40", "--seed", "5", "--out", str(out)
        )
    assert result.returncode == 0, result.stderr
    (z,) = seen
    columns = torch.tensor([3, 7]).repeat(40)  # row-major: (row 0: 3, 7), (row 1: 3, 7), ...
    far = far_from_centre(z)
    assert far.sum() > 50 and torch.equal(component_of(z)[far], columns[far])
    assert same_picture(read_grid(out), as_grid(run.decode(z), 40, 2))

    walk = tmp_path / "walk.png"
    with decoder_inputs(2) as seen:
        result = run_cli(
            "sample",
            str(cli_run),
            "--interpolate",
            "--labels",
            "2,5",
            "-n",
            "20",
            "--steps",
            "4",
            "--out",
            str(walk),
        )
    assert result.returncode == 0, result.stderr
    (points,) = seen
    ends = points.reshape(20, 4, 2)[:, [0, -1]].reshape(40, 2)
    rows = torch.tensor([2, 5]).repeat(10).repeat_interleave(2)
    far = far_from_centre(ends)
    assert far.sum() > 25 and torch.equal(component_of(ends)[far], rows[far])
    assert same_picture(read_grid(walk), as_grid(run.decode(points), 20, 4))


def test_gaussian_posterior_samples_while_training_and_gives_its_mean_when_evaluating(trained):
    """The Gaussian posterior (§2): while training z = mu(x) + sigma(x) * eps, eps ~ N(0, I) drawn from the
    generator it is given (the run's noise stream, so that resuming is exact); when evaluating, mu(x)."""
    run_dir, ref = trained
    run = aaekit.load(run_dir)
    encoder = run.model.encoder
    x = ref["x"].reshape(6, -1)
    with torch.no_grad():  # mu and log sigma^2, the two halves of the code's output layer
        mean, logvar = encoder.outputs["z"](encoder.trunk(x)).chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(min=encoder.min_logvar))

    evaluated = run.encode(ref["x"])["z"]
    torch.testing.assert_close(evaluated, mean, rtol=0, atol=0)
    with torch.no_grad():
        assert torch.equal(encoder(x, generator=torch.Generator().manual_seed(9))["z"], mean)

    reps = 4000

    @torch.no_grad()
    def draws(seed: int) -> torch.Tensor:  # reps draws for each of the 6 examples, in training mode
        return encoder(x.repeat(reps, 1), generator=torch.Generator().manual_seed(seed))["z"]

    encoder.train()
    try:
        first, again, other = draws(1), draws(1), draws(2)
    finally:
        encoder.eval()
    assert torch.equal(first, again) and not torch.equal(first, other)
    eps = ((first - mean.repeat(reps, 1)) / std.repeat(reps, 1)).reshape(reps, 6, 2)
    # 4000 draws per value: the mean of eps within 0.07 of 0 (4.4 standard errors), its spread within 6 % of 1
    assert eps.mean(0).abs().max() < 0.07, eps.mean(0)
    assert (eps.std(0) - 1).abs().max() < 0.06, eps.std(0)


def test_eval_parzen_and_corrupt_weights_through_the_cli(cli_run, tmp_path):
    out = tmp_path / "parzen.json"
    # no --metric: a model with one continuous code is scored by its likelihood
    result = run_cli(
        "eval",
        str(cli_run),
        "-n",
        "500",
        "--test-limit",
        "200",
        "--sigmas",
        "0.1,0.2,0.4,0.8,1.6",
        "--output",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report == json.loads(out.read_text()) and report["metric"] == "parzen"
    assert report["num_samples"] == 500 and report["num_test"] == 200 and report["unit"] == "nats"
    assert f"parzen: {report['log_likelihood']:.2f} ± " in result.stderr  # the one-line summary
    assert "nats on 200 test examples, 500 samples" in result.stderr
    best = max(range(5), key=report["validation_log_likelihood"].__getitem__)
    if 0 < best < 4:  # refined between the grid's neighbours of its best value
        fine = report["sigma_fine_grid"]
        assert report["sigma_grid"][best] in fine and report["sigma"] in fine
        assert report["sigma_grid"][best - 1] <= report["sigma"] <= report["sigma_grid"][best + 1]
        assert (
            report["sigma"]
            == fine[max(range(len(fine)), key=report["validation_log_likelihood_fine"].__getitem__)]
        )
    else:
        assert report["sigma"] == report["sigma_grid"][best]
    assert report["standard_error"] > 0 and -5000 < report["log_likelihood"] < 1000

    again = run_cli("eval", str(cli_run), "-n", "10", "--output", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr

    broken = tmp_path / "broken"
    shutil.copytree(cli_run, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    for args in (
        ["eval", str(broken), "-n", "10"],
        ["sample", str(broken), "--out", str(tmp_path / "x.png")],
    ):
        bad = run_cli(*args)
        assert bad.returncode == 2
        assert "model.safetensors: corrupt or unreadable" in bad.stderr and "Traceback" not in bad.stderr


def test_log_with_tensorboard_logs_the_metrics_of_metrics_jsonl(tmp_path):
    """`--log-with tensorboard`: every numeric metric line also reaches the tracker, at the same steps.
    In a process of its own (the tracker's writer threads end with it), with a timeout instead of a hang."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import aaekit_process

    run = tmp_path / "tb"
    result = aaekit_process(
        *tiny_run_args("recipes/gaussian.toml", run, "train.pictures=false"),
        "--log-with",
        "tensorboard",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    scalars: dict[str, list] = {}
    for events in run.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(acc.Scalars(tag))
    for key in ("loss/reconstruction", "loss/discriminator.z", "accuracy/code.z"):
        logged = sorted((e.step, e.value) for e in scalars[key])
        assert [s for s, _ in logged] == [line["step"] for line in lines], key
        assert [v for _, v in logged] == pytest.approx([line[key] for line in lines], rel=1e-6), key


def test_eval_and_load_from_a_checkpoint_of_an_unfinished_run(tmp_path):
    run_dir = tmp_path / "semi"
    done = run_cli(
        *tiny_run_args(
            "recipes/semisupervised_100.toml",
            run_dir,
            "train.max_steps=6",
            "train.checkpoint_every=1",
            "train.keep_checkpoints=4",
            "train.pictures=false",
            "data.validation=0",
            "data.labelled=40",
        )
    )
    assert done.returncode == 0, done.stderr
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert kept == [f"step-0000000{i}" for i in (3, 4, 5, 6)], kept  # the newest four (the last at the end)
    final, early = aaekit.load(run_dir), aaekit.load(run_dir, checkpoint="3")
    assert early.weights_path == run_dir / "checkpoints" / "step-00000003" / "model.safetensors"
    w = "encoder.outputs.y.weight"
    assert not torch.equal(final.model.state_dict()[w], early.model.state_dict()[w])
    assert torch.equal(
        aaekit.load(run_dir, checkpoint="step-00000004").model.state_dict()[w],
        load_file(run_dir / "checkpoints" / "step-00000004" / "model.safetensors")[w],
    )

    result = run_cli("eval", str(run_dir), "--checkpoint", "3", "--test-limit", "200", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["weights"].endswith("step-00000003/model.safetensors")
    wrong = run_cli("eval", str(run_dir), "--checkpoint", "7", "--device", "cpu")
    assert wrong.returncode == 2 and "no checkpoint '7'" in wrong.stderr and "step-00000004" in wrong.stderr
    assert "Traceback" not in wrong.stderr

    # A crashed run: no final weights. The message points at --checkpoint; "latest" skips a truncated newest
    # one.
    (run_dir / "model.safetensors").unlink()
    crashed = run_cli("eval", str(run_dir), "--device", "cpu")
    assert crashed.returncode == 2 and "--checkpoint latest" in crashed.stderr
    newest = max((run_dir / "checkpoints").iterdir())
    older = sorted((run_dir / "checkpoints").iterdir())[-2]
    (newest / "model.safetensors").write_bytes(b"\0" * 10)
    assert aaekit.load(run_dir, checkpoint="latest").weights_path == older / "model.safetensors"
    with pytest.raises(UserError, match="truncated"):
        aaekit.load(run_dir, checkpoint=newest.name)
