"""A short gmm_label run on real MNIST writes the three pictures; matplotlib stays out of training."""

from __future__ import annotations

import subprocess
import sys

import torch
from helpers_promises import as_grid, component_of, decoder_inputs, far_from_centre, read_grid, same_picture
from PIL import Image

import aaekit as aaekit_api
from conftest import ROOT, aaekit, tiny_run_args


def test_gmm_label_run_writes_the_three_pictures(tmp_path):
    run_dir = tmp_path / "run"
    with decoder_inputs(2) as seen:  # what the decoder is given while the pictures are drawn
        result = aaekit(*tiny_run_args("recipes/gmm_label.toml", run_dir))
    assert result.returncode == 0, result.stderr
    for name in ("samples.png", "reconstructions.png", "latent.png"):
        with Image.open(run_dir / name) as image:
            image.load()
            width, height = image.size
            assert width > 100 and height > 100, name
            darkest, brightest = image.convert("L").getextrema()
            assert brightest > darkest, f"{name} is a blank canvas"
    with Image.open(run_dir / "samples.png") as samples:
        assert samples.size == (10 * 28, 10 * 28)  # 10 rows x one column per component
    # samples.png decodes, in column k, draws of the prior's component k (the first picture drawn)
    z = next(x for x in seen if len(x) == 100)
    columns = torch.arange(10).repeat(10)
    far = far_from_centre(z)
    assert far.sum() > 60 and torch.equal(component_of(z)[far], columns[far])
    model = aaekit_api.load(run_dir).model
    with torch.no_grad():
        decoded = model.to_data_space(model.decoder(z)).reshape(100, 28, 28)
    # the run decoded with bf16 weights, this with the saved fp32 ones: a little more than the PNG's rounding
    # apart
    assert same_picture(read_grid(run_dir / "samples.png"), as_grid(decoded, 10, 10), tolerance=5 / 255)
    with Image.open(run_dir / "reconstructions.png") as recon:
        assert recon.size == (20 * 28, 5 * 28)  # 50 inputs, each beside its reconstruction


def test_pictures_can_be_switched_off(tmp_path):
    run_dir = tmp_path / "run"
    result = aaekit(*tiny_run_args("recipes/gmm_label.toml", run_dir, "train.pictures=false"))
    assert result.returncode == 0, result.stderr
    assert not list(run_dir.glob("*.png"))


def test_matplotlib_is_not_imported_by_training():
    code = (
        "import sys, aaekit.cli, aaekit.engine, aaekit.runs, aaekit.model; print('matplotlib' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
