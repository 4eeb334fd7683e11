"""§2.3: label information in the adversarial regularization. What the discriminator sees, which prior
component each real sample comes from, partial labelling, the refusals at validation, the imbalance
warning."""

from __future__ import annotations

import math
import re
import textwrap

import pytest
import torch

from aaekit.data import balanced_subset
from aaekit.errors import RecipeError
from aaekit.model import build_model, one_hot_with_unlabelled
from aaekit.plugins import get_registry
from aaekit.recipe import load_recipe
from conftest import ROOT, TINY, aaekit

GMM_LABEL = ROOT / "recipes" / "gmm_label.toml"
SMALL = [*TINY, "codes.z.discriminator.hidden=[16]"]


def test_one_hot_with_unlabelled_slot():
    onehot = one_hot_with_unlabelled(torch.tensor([3, -1, 0, 9]), 10)
    assert onehot.shape == (4, 11)
    assert onehot.argmax(1).tolist() == [3, 10, 0, 9]
    assert torch.equal(onehot.sum(1), torch.ones(4, dtype=onehot.dtype))


def test_label_conditioning_widens_and_changes_the_discriminator_input():
    conditioned = build_model(load_recipe(GMM_LABEL, SMALL), get_registry(), (28, 28), 10)
    plain = build_model(
        load_recipe(GMM_LABEL, [*SMALL, "codes.z.discriminator.label_conditioned=false"]),
        get_registry(),
        (28, 28),
        10,
    )
    assert conditioned.discriminators["z"][0].in_features == 2 + 11  # code + one-hot + "unlabelled"
    assert plain.discriminators["z"][0].in_features == 2

    z = torch.randn(3, 2)
    labels = torch.tensor([4, -1, 7])
    seen = conditioned.discriminator_input("z", z, labels)
    assert seen.shape == (3, 13)
    assert torch.equal(seen[:, :2], z)
    assert seen[:, 2:].argmax(1).tolist() == [4, 10, 7]
    # the same code with another label is a different input: the discriminator can tell classes apart
    assert not torch.equal(seen, conditioned.discriminator_input("z", z, torch.tensor([5, -1, 7])))
    assert torch.equal(plain.discriminator_input("z", z, labels), z)


@pytest.fixture
def trainer(tmp_path):
    from aaekit.engine import Trainer

    def make(*overrides):
        recipe = load_recipe(GMM_LABEL, [*SMALL, "run.mixed_precision=no", *overrides])
        t = Trainer(recipe, tmp_path, get_registry())
        t.prepare(None)
        return t

    return make


def component_of(z: torch.Tensor) -> torch.Tensor:
    """Which arm of the 10-component gmm a 2-D point lies on (its angle, to the nearest 2*pi/10)."""
    angle = torch.remainder(torch.atan2(z[:, 1], z[:, 0]), 2 * math.pi)
    return torch.round(angle / (2 * math.pi / 10)).long() % 10


def test_prior_samples_carry_the_label_of_their_component(trainer):
    t = trainer()
    labels = torch.arange(10).repeat(50)
    disc_labels = torch.cat([labels, torch.full((500,), -1)])
    z = t.prior_samples("z", disc_labels)
    far = z[:500].norm(dim=1) > 0.6  # near the centre the arms overlap
    assert torch.equal(component_of(z[:500])[far], labels[far])
    # unlabelled rows come from the full mixture: every component appears
    assert set(component_of(z[500:][z[500:].norm(dim=1) > 0.6]).tolist()) == set(range(10))


def test_without_conditioning_prior_components_ignore_the_labels(trainer):
    t = trainer("codes.z.discriminator.label_conditioned=false")
    z = t.prior_samples("z", torch.zeros(1000, dtype=torch.long))
    assert len(set(component_of(z[z.norm(dim=1) > 0.6]).tolist())) == 10


def test_partial_labelling_is_balanced_and_reproducible(trainer):
    t = trainer("data.labelled=100")
    labelled = t.train_data.y.cpu()[t.labelled_mask.cpu()]
    assert len(labelled) == 100
    assert torch.bincount(labelled, minlength=10).tolist() == [10] * 10
    again = trainer("data.labelled=100")
    assert torch.equal(again.labelled_index, t.labelled_index)
    other_seed = trainer("data.labelled=100", "run.seed=5")
    assert not torch.equal(other_seed.labelled_index, t.labelled_index)
    fraction = trainer("data.labelled=0.25")
    assert int(fraction.labelled_mask.sum()) == 100


def test_balanced_subset_spreads_a_remainder_and_depends_only_on_the_seed():
    labels = torch.arange(10).repeat(30)[torch.randperm(300, generator=torch.Generator().manual_seed(1))]
    a = balanced_subset(labels, 25, 10, seed=7)
    assert torch.equal(a, balanced_subset(labels, 25, 10, seed=7))
    assert not torch.equal(a, balanced_subset(labels, 25, 10, seed=8))
    counts = torch.bincount(labels[a], minlength=10)
    assert counts.sum() == 25 and counts.max() - counts.min() <= 1
    assert len(a.unique()) == 25
    with pytest.raises(ValueError, match="class 0 has only 30"):
        balanced_subset(labels, 400, 10, seed=0)


def with_prior(tmp_path, prior_table: str):
    """gmm_label.toml with its [codes.z.prior] table replaced."""
    text = re.sub(
        r"\[codes\.z\.prior\]\n(?:[^\[\n].*\n|\n)*",
        f"[codes.z.prior]\n{prior_table}\n\n",
        GMM_LABEL.read_text(),
    )
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def problems_of(path, *overrides, plugins_dirs=None) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, list(overrides), get_registry(plugins_dirs))
    return info.value.problems


def test_refused_prior_without_components(tmp_path):
    path = with_prior(tmp_path, 'name = "gaussian"')
    [problem] = problems_of(path)
    assert problem.startswith(
        f"{path}: codes.z.discriminator.label_conditioned: prior 'gaussian' has no components"
    )
    assert "label_conditioned = false" in problem


def test_refused_component_count_not_matching_classes(tmp_path):
    [problem] = problems_of(GMM_LABEL, "codes.z.prior.components=8")
    assert "has 8 components but dataset 'mnist' has 10 classes" in problem
    [problem] = problems_of(with_prior(tmp_path, 'name = "swiss_roll"\ncomponents = 12'))
    assert "prior 'swiss_roll' has 12 components" in problem


UNLABELLED_PLUGIN = '''
    import torch
    from aaekit.contracts import ArrayData, Dataset
    from aaekit.hookspecs import hookimpl


    class Blobs(Dataset):
        """Unlabelled 2x2 test blobs."""
        name = "unlabelled_blobs"
        input_shape = (2, 2)
        num_classes = None

        def load(self, split):
            x = torch.rand(200, 2, 2, generator=torch.Generator().manual_seed(0))
            return ArrayData(x, torch.full((200,), -1))


    @hookimpl
    def register_datasets(register):
        register(Blobs)
'''


def test_refused_dataset_without_labels(tmp_path):
    (tmp_path / "blobs.py").write_text(textwrap.dedent(UNLABELLED_PLUGIN))
    problems = problems_of(GMM_LABEL, "data.name=unlabelled_blobs", plugins_dirs=[str(tmp_path)])
    assert any(
        "codes.z.discriminator.label_conditioned: dataset 'unlabelled_blobs' has no labels; "
        "set label_conditioned = false" in p
        for p in problems
    ), problems


def test_validate_cli_reports_the_refusal_without_a_traceback(tmp_path):
    recipe = with_prior(tmp_path, 'name = "uniform"')
    result = aaekit("validate", str(recipe))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert (
        f"error: {recipe}: codes.z.discriminator.label_conditioned: prior 'uniform' has no components"
        in result.stderr
    )
    assert aaekit("validate", str(GMM_LABEL)).returncode == 0


def test_imbalance_warning_fires_once_per_code(trainer, capsys):
    t = trainer("train.imbalance_warning_steps=30")
    discriminator_wins = {"accuracy/prior.z": 1.0, "accuracy/code.z": 1.0}
    balanced = {"accuracy/prior.z": 0.6, "accuracy/code.z": 0.5}
    t.monitor.check_imbalance(discriminator_wins, 20)
    t.monitor.check_imbalance(balanced, 20)  # a balanced stretch resets the count
    t.monitor.check_imbalance(discriminator_wins, 20)
    assert "warning" not in capsys.readouterr().out
    t.monitor.check_imbalance(discriminator_wins, 20)
    out = capsys.readouterr().out
    assert out.count("warning: for code 'z' the discriminator has been winning for 40 steps") == 1
    for _ in range(5):
        t.monitor.check_imbalance({"accuracy/prior.z": 0.5, "accuracy/code.z": 0.0}, 20)
    assert "warning" not in capsys.readouterr().out  # once per code, whichever side wins


def test_imbalance_warning_for_the_encoder_side(trainer, capsys):
    t = trainer("train.imbalance_warning_steps=10")
    t.monitor.check_imbalance({"accuracy/prior.z": 0.5, "accuracy/code.z": 0.0}, 10)
    assert "the encoder (generator) has been winning" in capsys.readouterr().out


def test_imbalance_warning_catches_the_measured_failure(trainer, capsys):
    """gmm_label with a too slow generator ended at 94 % accuracy on codes, 99 % on prior samples, with the
    codes far outside the prior: that must warn; a healthy run (45 % / 80 %) must not."""
    t = trainer("train.imbalance_warning_steps=20")
    t.monitor.check_imbalance({"accuracy/prior.z": 0.80, "accuracy/code.z": 0.45}, 100)
    assert "warning" not in capsys.readouterr().out
    t.monitor.check_imbalance({"accuracy/prior.z": 0.9855, "accuracy/code.z": 0.9445}, 100)
    assert "the discriminator has been winning for 100 steps" in capsys.readouterr().out


def test_decoder_label_input_needs_every_label():
    """§4 feeds the label to the decoder: with part of the labels it would see labels declared unknown."""
    supervised = GMM_LABEL.parent / "supervised.toml"
    [problem] = problems_of(supervised, "data.labelled=100")
    assert "decoder.label_input: needs every training label, but data.labelled = 100" in problem
    load_recipe(supervised, ["data.labelled=100", "decoder.label_input=false"], get_registry())  # accepted
