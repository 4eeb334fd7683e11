"""The built-in priors, as the registry hands them out: shape, label-to-component assignment, moments
(statistically, with generous tolerances for 20k samples) and reproducibility from a seeded generator."""

from __future__ import annotations

import math

import pytest
import torch

from aaekit.plugins import get_registry

N = 20_000


def build(name: str, dim: int, **params):
    return get_registry().get("prior", name).cls(dim=dim, **params)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "name, dim, params, components",
    [
        ("gaussian", 8, {}, None),
        ("uniform", 3, {}, None),
        ("gmm", 2, {}, 10),
        ("gmm", 5, {"components": 4}, 4),
        ("swiss_roll", 2, {}, 10),
        ("categorical", 7, {}, 7),
    ],
)
def test_declared_shape_components_and_seeded_reproducibility(name, dim, params, components):
    prior = build(name, dim, **params)
    assert prior.num_components == components
    assert get_registry().get("prior", name).cls.components({**_defaults(name), **params}, dim) == components
    a = prior.sample(64, generator=seeded(3))
    b = prior.sample(64, generator=seeded(3))
    c = prior.sample(64, generator=seeded(4))
    assert a.shape == (64, dim) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    if components:
        labels = torch.arange(64) % components
        assert prior.sample(64, labels, generator=seeded(0)).shape == (64, dim)


def _defaults(name: str) -> dict:
    return {k: p.default for k, p in get_registry().get("prior", name).cls.params.items()}


def test_gaussian_moments():
    z = build("gaussian", 4, std=5.0, mean=1.0).sample(N, generator=seeded())
    assert torch.allclose(z.mean(0), torch.full((4,), 1.0), atol=0.15)
    assert torch.allclose(z.std(0), torch.full((4,), 5.0), rtol=0.03)


def test_uniform_bounds_and_moments():
    z = build("uniform", 3, low=-2.0, high=4.0).sample(N, generator=seeded())
    assert z.min() >= -2.0 and z.max() <= 4.0
    assert torch.allclose(z.mean(0), torch.full((3,), 1.0), atol=0.06)
    assert torch.allclose(z.std(0), torch.full((3,), 6 / math.sqrt(12)), rtol=0.03)
    # it fills the cube, not a corner of it
    assert z.min() < -1.95 and z.max() > 3.95


def test_gmm_component_k_is_the_papers_rotated_gaussian():
    """Component k: a ~ N(1.4, 0.5^2) along the direction 2*pi*k/10, b ~ N(0, 0.05^2) across it."""
    prior = build("gmm", 2)
    for k in range(10):
        labels = torch.full((N // 4,), k)
        z = prior.sample(len(labels), labels, generator=seeded(k))
        angle = 2 * math.pi * k / 10
        along_dir = torch.tensor([math.cos(angle), math.sin(angle)])
        across_dir = torch.tensor([-math.sin(angle), math.cos(angle)])
        centre = 1.4 * along_dir
        assert torch.allclose(z.mean(0), centre, atol=0.03), (k, z.mean(0), centre)
        along, across = z @ along_dir, z @ across_dir
        assert abs(along.std() - 0.5) < 0.02
        assert abs(across.std() - 0.05) < 0.003


def test_gmm_without_labels_draws_every_component_evenly_and_respects_geometry_params():
    prior = build("gmm", 2, components=4, shift=3.0, std_along=0.1, std_across=0.1, scale=2.0)
    z = prior.sample(N, generator=seeded())
    # every sample lies near one of the 4 centres 6*(cos, sin)(2*pi*k/4)
    centres = torch.stack(
        [6 * torch.tensor([math.cos(a), math.sin(a)]) for a in (2 * math.pi * k / 4 for k in range(4))]
    )
    nearest = torch.cdist(z, centres).argmin(1)
    assert torch.cdist(z, centres).min(1).values.max() < 2.0
    counts = torch.bincount(nearest, minlength=4).float() / N
    assert torch.allclose(counts, torch.full((4,), 0.25), atol=0.02)


def test_gmm_extra_dimensions_are_narrow_gaussians():
    z = build("gmm", 5).sample(N, torch.zeros(N, dtype=torch.long), generator=seeded())
    assert torch.allclose(z[:, 2:].mean(0), torch.zeros(3), atol=0.005)
    assert torch.allclose(z[:, 2:].std(0), torch.full((3,), 0.05), rtol=0.05)


def test_swiss_roll_segment_k_covers_its_radius_range():
    """Segment k: u in [k/10, (k+1)/10), r = 3*sqrt(u), angle = 4*pi*sqrt(u)."""
    prior = build("swiss_roll", 2)
    for k in range(10):
        labels = torch.full((2000,), k)
        z = prior.sample(len(labels), labels, generator=seeded(k))
        r = z.norm(dim=1)
        low, high = 3 * math.sqrt(k / 10), 3 * math.sqrt((k + 1) / 10)
        assert r.min() >= low - 1e-5 and r.max() <= high + 1e-5
        assert r.min() < low + 0.05 * (high - low) and r.max() > high - 0.05 * (high - low)
        # the angle follows the radius: angle = 4*pi*r/3 (mod 2*pi)
        expected = 4 * math.pi * r / 3
        diff = torch.atan2(z[:, 1], z[:, 0]) - expected
        assert torch.allclose(
            torch.remainder(diff + math.pi, 2 * math.pi) - math.pi, torch.zeros_like(diff), atol=1e-3
        )


def test_swiss_roll_without_labels_is_uniform_in_u():
    z = build("swiss_roll", 2).sample(N, generator=seeded())
    u = (z.norm(dim=1) / 3) ** 2
    assert abs(u.mean() - 0.5) < 0.01
    assert abs(u.std() - 1 / math.sqrt(12)) < 0.01


def test_categorical_is_one_hot_of_the_label_and_uniform_without():
    prior = build("categorical", 10)
    labels = torch.tensor([3, 0, 9, 3])
    y = prior.sample(4, labels, generator=seeded())
    assert torch.equal(y, torch.nn.functional.one_hot(labels, 10).float())
    y = prior.sample(N, generator=seeded())
    assert torch.equal(y.sum(1), torch.ones(N))
    assert set(y.unique().tolist()) == {0.0, 1.0}
    assert torch.allclose(y.mean(0), torch.full((10,), 0.1), atol=0.01)


def test_smoothed_categorical_stays_on_the_simplex_near_its_label():
    """smoothing = s: each sample is (1 - w) one-hot + w * (uniform point of the simplex), w ~ U(0, s)."""
    prior = build("categorical", 10, smoothing=0.2)
    labels = torch.arange(N) % 10
    y = prior.sample(N, labels, generator=seeded())
    assert torch.allclose(y.sum(1), torch.ones(N), atol=1e-5) and (y >= 0).all()
    assert torch.equal(y.argmax(1), labels)
    top = y.max(1).values
    # never exactly one-hot, never further than the weight allows
    assert top.min() >= 0.8 - 1e-6 and top.max() < 1
    # E[top] = 1 - E[w] + E[w] E[d_label] = 1 - 0.1 + 0.1 * 0.1
    assert abs(top.mean().item() - 0.91) < 0.005
    off = y[torch.arange(N), (labels + 1) % 10]
    assert abs(off.mean().item() - 0.01) < 0.001  # E[w] * E[d_other] = 0.1 * 0.1


def check_priors_on(device: str) -> None:
    """Every built-in prior drawing on ``device`` from a generator there: the samples are on that device,
    reproducible from the seed, and distributed as on the CPU (moments, bounds, the label's component)."""

    def gen(seed: int) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(seed)

    for name, dim in (("gaussian", 2), ("uniform", 2), ("gmm", 2), ("swiss_roll", 2), ("categorical", 10)):
        prior = build(name, dim)
        z = prior.sample(N, generator=gen(0), device=device)
        assert z.device.type == torch.device(device).type, name
        assert z.shape == (N, dim) and z.dtype == torch.float32, name
        assert torch.equal(z, prior.sample(N, generator=gen(0), device=device)), name
        assert not torch.equal(z, prior.sample(N, generator=gen(1), device=device)), name
        assert torch.isfinite(z).all(), name

    z = build("gaussian", 4, std=5.0, mean=1.0).sample(N, generator=gen(2), device=device).cpu()
    assert torch.allclose(z.mean(0), torch.full((4,), 1.0), atol=0.15)
    assert torch.allclose(z.std(0), torch.full((4,), 5.0), rtol=0.03)
    z = build("uniform", 3, low=-2.0, high=4.0).sample(N, generator=gen(3), device=device).cpu()
    assert z.min() >= -2.0 and z.max() <= 4.0 and z.min() < -1.95 and z.max() > 3.95
    assert torch.allclose(z.mean(0), torch.full((3,), 1.0), atol=0.06)

    labels = (torch.arange(N) % 10).to(device)
    z = build("gmm", 2).sample(N, labels, generator=gen(4), device=device).cpu()
    far = z.norm(dim=1) > 1.0  # clear of the centre, where the arms overlap
    angle = torch.remainder(torch.atan2(z[:, 1], z[:, 0]), 2 * math.pi)
    assert torch.equal((torch.round(angle / (2 * math.pi / 10)).long() % 10)[far], labels.cpu()[far])
    r = build("swiss_roll", 2).sample(N, labels, generator=gen(5), device=device).cpu().norm(dim=1)
    k = labels.cpu()
    assert (r >= 3 * torch.sqrt(k / 10) - 1e-5).all() and (r <= 3 * torch.sqrt((k + 1) / 10) + 1e-5).all()
    y = build("categorical", 10).sample(N, labels, generator=gen(6), device=device).cpu()
    assert torch.equal(y, torch.nn.functional.one_hot(labels.cpu(), 10).float())
    y = build("categorical", 10).sample(N, generator=gen(7), device=device).cpu()
    assert torch.allclose(y.mean(0), torch.full((10,), 0.1), atol=0.01)


def test_priors_sample_on_the_generators_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    check_priors_on("cuda")
