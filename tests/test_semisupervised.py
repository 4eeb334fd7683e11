"""§4/§5: labelled subset, the classification phase, two discriminators, a real short run, style.png."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from aaekit.data import balanced_subset
from conftest import aaekit, prepared_trainer, tiny_run_args

SMALL = [
    "data.limit=400",
    "train.batch_size=20",
    "encoder.hidden=[32]",
    "decoder.hidden=[32]",
    "codes.y.discriminator.hidden=[16]",
    "codes.z.discriminator.hidden=[16]",
    "data.labelled=40",
    "data.validation=0",
]


def trainer_for(recipe: str, tmp_path, *overrides):
    return prepared_trainer(recipe, tmp_path, [*SMALL, *overrides])


def snapshot(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_labelled_subset_is_balanced_and_reproducible():
    labels = torch.arange(1000) % 10
    labels = labels[torch.randperm(1000, generator=torch.Generator().manual_seed(5))]
    a, b = balanced_subset(labels, 100, 10, seed=3), balanced_subset(labels, 100, 10, seed=3)
    assert torch.equal(a, b) and len(a.unique()) == 100
    assert torch.bincount(labels[a], minlength=10).tolist() == [10] * 10
    assert not torch.equal(a, balanced_subset(labels, 100, 10, seed=4))
    odd = balanced_subset(labels, 15, 10, seed=0)  # uneven counts differ by at most one per class
    counts = torch.bincount(labels[odd], minlength=10)
    assert counts.sum() == 15 and counts.max() - counts.min() <= 1


def test_trainer_labels_a_balanced_subset(tmp_path):
    trainer = trainer_for("recipes/semisupervised_100.toml", tmp_path)
    y = trainer.train_data.y.cpu()[trainer.labelled_index]
    assert torch.bincount(y, minlength=10).tolist() == [4] * 10


def test_classification_phase_changes_only_the_encoder(tmp_path):
    trainer = trainer_for("recipes/semisupervised_100.toml", tmp_path)
    before = snapshot(trainer.model)
    trainer.classification_phase()
    after = snapshot(trainer.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("encoder.") for k in changed), changed
    assert any(k.startswith("encoder.outputs.y") for k in changed)


def test_both_discriminators_train_every_step(tmp_path):
    trainer = trainer_for("recipes/semisupervised_100.toml", tmp_path)
    for step in range(2):
        before = snapshot(trainer.model)
        index = trainer.batches.take(20)
        metrics = trainer.train_step(index)
        after = snapshot(trainer.model)
        for code in ("y", "z"):
            keys = [k for k in before if k.startswith(f"discriminators.{code}.")]
            assert any(not torch.equal(before[k], after[k]) for k in keys), (step, code)
            assert f"loss/discriminator.{code}" in metrics and f"loss/generator.{code}" in metrics
        assert "loss/classification" in metrics


def test_a_codes_discriminator_lr_scale_applies_to_that_discriminator_only(tmp_path):
    trainer = trainer_for(
        "recipes/semisupervised_100.toml",
        tmp_path,
        "codes.y.discriminator.lr_scale=0",
        "codes.z.discriminator.lr_scale=0.5",
        "train.lr_milestones=[1]",
        "train.lr_gamma=0.1",
    )
    base = trainer.recipe.values["optim"]["discriminator"]["lr"]
    rates = lambda: {c: o.param_groups[0]["lr"] for c, o in trainer.opt_discriminators.items()}  # noqa: E731
    assert rates() == {"y": 0.0, "z": base * 0.5}
    trainer.set_epoch_lr(1)
    assert rates() == {"y": 0.0, "z": base * 0.5 * 0.1}
    assert (
        trainer.opt_generator.param_groups[0]["lr"] == trainer.recipe.values["optim"]["generator"]["lr"] * 0.1
    )
    trainer.set_epoch_lr(0)
    before = snapshot(trainer.model)
    trainer.train_step(trainer.batches.take(20))
    after = snapshot(trainer.model)

    def moved(code):
        return any(
            not torch.equal(before[k], after[k]) for k in before if k.startswith(f"discriminators.{code}.")
        )

    assert not moved("y") and moved("z")


def test_short_run_classifies_well_above_chance(tmp_path):
    run = tmp_path / "semi"
    args = [
        "run",
        "recipes/semisupervised_1000.toml",
        "data.limit=2000",
        "data.labelled=300",
        "data.validation=500",
        "train.max_steps=200",
        "train.epochs=20",
        "train.batch_size=50",
        "train.log_every=100",
        "train.pictures=false",
        "encoder.hidden=[128]",
        "decoder.hidden=[128]",
        "codes.y.discriminator.hidden=[32]",
        "codes.z.discriminator.hidden=[32]",
        "--output-dir",
        str(run),
    ]
    done = aaekit(*args)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("validation/error.y" in record for record in lines)  # logged per epoch on the held-out split
    # the metric follows the recipe
    result = aaekit("eval", str(run), "--test-limit", "1000", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert (
        json.loads(result.stdout)["metric"] == "classification" and "metric: classification" in result.stderr
    )
    error = json.loads(result.stdout)["error"]
    assert error < 0.5, error  # chance is 0.9
    assert "test classification error" in result.stderr


def test_supervised_run_writes_the_style_grid(tmp_path):
    """style.png (the paper's Figure 7): each row decodes one z, a new one per row, with every class in turn
    along it. The decoder's inputs while the pictures are drawn are observed, and the one that style.png shows
    is checked: z shared along each row, the one-hot labels 0..9 along every row."""
    from helpers_promises import as_grid, decoder_inputs, read_grid, same_picture

    import aaekit as api

    run = tmp_path / "sup"
    with decoder_inputs(10 + 10) as seen:  # z (10) and the one-hot label (10)
        done = aaekit(*tiny_run_args("recipes/supervised.toml", run))
    assert done.returncode == 0, done.stderr
    grid = read_grid(run / "style.png")
    assert grid.shape == (280, 280)  # 10 styles x 10 classes of 28x28
    model = api.load(run).model
    with torch.no_grad():
        shown = [
            x
            for x in seen
            if len(x) == 100
            and same_picture(
                grid, as_grid(model.to_data_space(model.decoder(x)).reshape(100, 28, 28), 10, 10)
            )
        ]
    assert shown, "style.png is not the decoding of any input the decoder was given"
    x = shown[-1].reshape(10, 10, 20)  # (row, column, decoder input)
    z, labels = x[..., :10], x[..., 10:]
    assert torch.equal(labels.argmax(-1), torch.arange(10).repeat(10, 1))  # column j: class j, in every row
    assert torch.equal(labels.sum(-1), torch.ones(10, 10))
    assert torch.equal(z, z[:, :1].expand(10, 10, 10))  # one z per row ...
    assert len({tuple(row.tolist()) for row in z[:, 0]}) == 10  # ... a different one in each
    # eval refuses a metric the model cannot give, with one clear line
    bad = aaekit("eval", str(run), "--metric", "classification", "--device", "cpu")
    assert bad.returncode == 2 and "no categorical code" in bad.stderr and "Traceback" not in bad.stderr


def test_discriminator_input_noise_blurs_prior_samples_and_codes_alike(tmp_path):
    """codes.<c>.discriminator.input_noise: the discriminator sees prior one-hots and codes with noise of that
    std in both of its steps; without it, the prior's rows are exact one-hots."""

    def seen_by_y_discriminator(*overrides):
        trainer = trainer_for("recipes/semisupervised_100.toml", tmp_path, *overrides)
        seen = []
        handle = trainer.model.discriminators["y"].register_forward_pre_hook(
            lambda m, a: seen.append(a[0].detach())
        )
        trainer.regularization_phase(
            trainer.train_data.inputs(trainer.batches.take(20)), torch.full((20,), -1)
        )
        handle.remove()
        return seen

    exact = seen_by_y_discriminator()
    assert len(exact) == 2  # discriminator step (prior rows, then code rows) and generator step (codes)
    prior_rows = exact[0][:20]
    assert torch.equal(prior_rows.max(dim=1).values, torch.ones(20)) and torch.equal(
        prior_rows.sum(dim=1), torch.ones(20)
    )

    noisy = seen_by_y_discriminator("codes.y.discriminator.input_noise=0.3")
    prior_noise = noisy[0][:20] - F.one_hot(noisy[0][:20].argmax(dim=1), 10)
    assert 0.2 < prior_noise.std().item() < 0.4
    for seen in (noisy[0][20:], noisy[1]):  # codes: softmax outputs plus noise leave the simplex
        assert (seen < 0).any() and not torch.allclose(seen.sum(dim=1), torch.ones(20), atol=1e-3)
