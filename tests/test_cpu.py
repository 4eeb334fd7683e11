"""The trainer's CPU settings, shown on torch's real compute threads."""

from __future__ import annotations

import pytest
import torch

from aaekit.cpu import set_flush_denormals
from conftest import ROOT, TINY, prepared_trainer

TINY_VALUE = 1e-30  # times 1e-10 gives 1e-40: a denormal in fp32


def flushed_fraction() -> float:
    """Fraction of a large elementwise product (split over every OpenMP thread) that came out as zero."""
    product = torch.full((1 << 21,), TINY_VALUE) * 1e-10
    return (product == 0).float().mean().item()


def main_thread_flushes() -> bool:
    return (torch.tensor([TINY_VALUE]) * 1e-10).item() == 0  # one element: computed on the calling thread


@pytest.fixture
def restore_flushing():
    before = main_thread_flushes()
    yield
    set_flush_denormals(before)


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs torch's thread pool (2+ threads)")
def test_flush_denormals_reaches_every_compute_thread(restore_flushing):
    flushed_fraction()  # the pool's worker threads exist from here on, as in any process that trained before
    if set_flush_denormals(False) == 0:
        pytest.skip("this CPU has no flush-to-zero mode")
    assert flushed_fraction() == 0.0  # strict IEEE: every element a denormal
    torch.set_flush_denormal(True)  # what torch offers: the calling thread only
    assert 0.0 < flushed_fraction() < 1.0, "the worker threads' share should have stayed denormal"
    assert set_flush_denormals(True) == torch.get_num_threads()
    assert flushed_fraction() == 1.0
    assert set_flush_denormals(False) == torch.get_num_threads()
    assert flushed_fraction() == 0.0


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs torch's thread pool (2+ threads)")
def test_trainer_applies_the_recipe_setting(tmp_path, restore_flushing):
    recipe = ROOT / "recipes" / "gaussian.toml"
    flushed_fraction()
    if set_flush_denormals(False) == 0:
        pytest.skip("this CPU has no flush-to-zero mode")
    prepared_trainer(recipe, tmp_path / "on", TINY)  # the default
    assert flushed_fraction() == 1.0
    prepared_trainer(recipe, tmp_path / "off", [*TINY, "run.flush_denormals=false"])
    assert flushed_fraction() == 0.0


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (independent of torch's own detection)."""
    try:
        text = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return set()
    return {
        flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":")[1].split()
    }


@pytest.mark.skipif(not cpu_flags(), reason="needs Linux's /proc/cpuinfo")
@pytest.mark.parametrize("precision", ["bf16", "no"])
def test_bf16_on_a_cpu_without_fast_bf16_is_named_at_the_start(tmp_path, precision):
    """On a CPU without AVX-512 (AVX2 only) bf16 trains several times slower than fp32: a run in bf16 says so
    and names the faster setting; fp32 never warns, and neither does bf16 where the CPU has AVX-512."""
    from conftest import aaekit, tiny_run_args

    result = aaekit(
        *tiny_run_args("recipes/gaussian.toml", tmp_path / "run", f"run.mixed_precision={precision}")
    )
    assert result.returncode == 0, result.stderr
    warned = 'run.mixed_precision = "bf16" is slow here' in result.stdout
    slow_cpu = "avx512bw" not in cpu_flags() and "amx_bf16" not in cpu_flags()
    assert warned == (precision == "bf16" and slow_cpu), result.stdout
    if warned:
        assert 'run.mixed_precision = "no" is faster on this machine' in result.stdout
