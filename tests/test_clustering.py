"""§6/§7: the three clustering errors, the cluster-heads head, a short real clustering run."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from aaekit.evaluation.clustering import clustering_errors, linear_assignment
from conftest import aaekit, tiny_run_args


def one_hot_probs(assigned, k):
    return torch.nn.functional.one_hot(torch.tensor(assigned), k).float()


def test_assignment_is_optimal_against_brute_force():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        n = int(torch.randint(1, 6, (1,), generator=g))
        m = n + int(torch.randint(0, 3, (1,), generator=g))
        cost = torch.randint(0, 20, (n, m), generator=g).float()
        cols = linear_assignment(cost)
        assert len(set(cols.tolist())) == n
        best = min(sum(cost[i, p[i]].item() for i in range(n)) for p in itertools.permutations(range(m), n))
        assert cost[torch.arange(n), cols].sum().item() == best


def test_three_metrics_on_hand_made_clusters():
    # 3 clusters, 2 classes. Training: cluster 0 = {0,0,1}, cluster 1 = {1,1}, cluster 2 = {1}.
    train_assigned = [0, 0, 0, 1, 1, 2]
    train_labels = torch.tensor([0, 0, 1, 1, 1, 1])
    probs = one_hot_probs(train_assigned, 3) * 0.5 + 0.1
    probs[2, 0] = 0.9  # the most confident member of cluster 0 is the one labelled 1 -> paper names it 1
    # test: two images in each cluster, labels 0,0 | 1,1 | 1,0
    test_probs = one_hot_probs([0, 0, 1, 1, 2, 2], 3)
    test_labels = torch.tensor([0, 0, 1, 1, 1, 0])
    errors = clustering_errors(probs, train_labels, test_probs, test_labels, classes=2)
    # paper: names (1, 1, 1) -> wrong on the three 0s
    assert errors["paper"] == pytest.approx(3 / 6)
    # majority: names (0, 1, 1) -> wrong only on the last 0
    assert errors["majority"] == pytest.approx(1 / 6)
    # Hungarian: class 0 -> cluster 0 (2 hits), class 1 -> cluster 1 (2 hits); cluster 2 unnamed -> 2 errors
    assert errors["hungarian"] == pytest.approx(2 / 6)


def test_hungarian_undoes_a_permutation():
    labels = torch.arange(30) % 3
    permuted = (labels + 1) % 3  # cluster = label + 1
    probs = one_hot_probs(permuted.tolist(), 3)
    errors = clustering_errors(probs, labels, probs, labels, classes=3)
    assert errors == {"paper": 0.0, "majority": 0.0, "hungarian": 0.0}


def test_cluster_heads_output_and_penalty_by_hand():
    from aaekit.contracts import CodeSpec
    from aaekit_builtins.heads import ClusterHeadsHead

    head = ClusterHeadsHead(
        codes=[CodeSpec("y", "categorical", 3), CodeSpec("z", "continuous", 2)],
        num_classes=3,
        eta=2.0,
        weight=0.5,
    )
    with torch.no_grad():
        head.heads.copy_(torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]]))
    y = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    z = torch.tensor([[0.1, 0.2], [1.0, -1.0]])
    out = head.decoder_input({"y": y, "z": z}, None)
    assert torch.allclose(out, torch.tensor([[0.1, 0.2], [2.5, 1.5]]))
    # distances: |c0-c1| = 5 -> 2 (capped at eta), |c0-c2| = 1, |c1-c2| = sqrt(9+9) -> 2
    assert torch.allclose(head.reconstruction_penalty(), torch.tensor(-0.5 * (2 + 1 + 2)))
    head.reconstruction_penalty().backward()  # only the pair closer than eta is pushed apart
    assert torch.allclose(head.heads.grad, torch.tensor([[0.0, 0.5], [0.0, 0.0], [0.0, -0.5]]), atol=1e-6)


def test_short_clustering_run_beats_a_random_assignment(tmp_path):
    """§6 on data with known clusters (a 4-component 2-D mixture), through `aaekit run` and `aaekit eval`.
    (A short MNIST run is not enough: cluster16's settings with 256-unit nets still put the test images into 2
    of 16 clusters after 800 steps, 108 s; the codes spread out over the first epochs.)"""
    from aaekit.recipe import dump_toml

    adam = {"name": "adam", "lr": 0.001, "betas": [0.5, 0.999]}
    recipe = tmp_path / "mixture_clusters.toml"
    recipe.write_text(
        dump_toml(
            {
                "run": {"seed": 0},
                "data": {"name": "mixture", "components": 4, "std": 0.3, "train_size": 2000},
                "encoder": {"name": "deterministic", "hidden": [64, 64]},
                "decoder": {"hidden": [64, 64], "output": "linear", "loss": "mse"},
                "codes": {
                    "y": {
                        "kind": "categorical",
                        "dim": 4,
                        "prior": {"name": "categorical"},
                        "discriminator": {"hidden": [32]},
                    },
                    "z": {"dim": 1, "prior": {"name": "gaussian"}, "discriminator": {"hidden": [32]}},
                },
                "optim": {
                    "reconstruction": {"name": "adam", "lr": 0.001},
                    "discriminator": adam,
                    "generator": adam,
                },
                "train": {
                    "batch_size": 50,
                    "max_steps": 400,
                    "log_every": 100,
                    "pictures": False,
                    "checkpoint_every": 0,
                },
            }
        )
    )
    run = tmp_path / "run"
    done = aaekit("run", str(recipe), "--output-dir", str(run))
    assert done.returncode == 0, done.stderr
    # no labels, a categorical code: clustering by default
    result = aaekit("eval", str(run), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert got["metric"] == "clustering"
    assert got["clusters"] == 4 and got["clusters_used_on_test"] >= 2
    # the same metrics for a random assignment of as many test points
    n = got["test_examples"]
    test_labels = torch.randint(4, (n,), generator=torch.Generator().manual_seed(0))
    random_probs = torch.rand(n, 4, generator=torch.Generator().manual_seed(1))
    chance = clustering_errors(random_probs, test_labels, random_probs.flip(0), test_labels, classes=4)
    assert got["error.majority"] < chance["majority"] - 0.25, (got, chance)
    assert got["error.paper"] < chance["paper"] - 0.25, (got, chance)


def test_cluster16_recipe_runs_and_draws_one_row_per_cluster(tmp_path):
    """clusters.png (the paper's Figure 9): row k holds the first 20 test images that the trained model
    assigns to cluster k (argmax q(y|x)), in test-set order, the rest of the row black."""
    from helpers_promises import as_grid, read_grid, same_picture

    import aaekit as api
    from aaekit.data import DeviceData
    from aaekit.evaluation.validation import encode_split

    run = tmp_path / "cluster16"
    done = aaekit(*tiny_run_args("recipes/cluster16.toml", run))
    assert done.returncode == 0, done.stderr
    grid = read_grid(run / "clusters.png")
    assert grid.shape == (16 * 28, 20 * 28)  # one row of test images per cluster

    loaded = api.load(run)
    test = DeviceData(loaded.dataset().load("test"), torch.device("cpu"))
    codes, _, _ = encode_split(loaded.model, test)  # the codes the picture was drawn from
    assigned = codes["y"].argmax(dim=1)
    rows = torch.zeros(16, 20, 28, 28)
    for cluster in range(16):
        members = (assigned == cluster).nonzero().flatten()[:20]
        rows[cluster, : len(members)] = test.inputs(members).reshape(-1, 28, 28)
    assert same_picture(grid, as_grid(rows.reshape(-1, 28, 28), 16, 20))
    assert grid.max() > 0.5  # test images were drawn, not only black rows
