"""The engine's step is the paper's schedule: checked against a hand-written step of plain PyTorch."""

from __future__ import annotations

import copy
import ctypes
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, prepared_trainer

SMALL = [
    "data.limit=300",
    "train.batch_size=20",
    "encoder.hidden=[24,24]",
    "decoder.hidden=[24,24]",
    "codes.z.discriminator.hidden=[16,16]",
    "train.pictures=false",
]


def gaussian_trainer(tmp_path, *overrides):
    return prepared_trainer("recipes/gaussian.toml", tmp_path, [*SMALL, *overrides])


def adam(params, settings):
    return torch.optim.Adam(params, lr=settings["lr"], betas=tuple(settings["betas"]))


class ReferenceStep:
    """Reconstruction (encoder + decoder), then the discriminator on prior samples against codes, then the
    generator (encoder) against the updated discriminator: three optimizers, each phase with current
    weights."""

    def __init__(self, trainer):
        m, optim = trainer.model, trainer.recipe.values["optim"]
        self.model = m
        self.encoder, self.decoder = copy.deepcopy(m.encoder), copy.deepcopy(m.decoder)
        self.discriminator = copy.deepcopy(m.discriminators["z"])
        self.opt_r = adam([*self.encoder.parameters(), *self.decoder.parameters()], optim["reconstruction"])
        self.opt_d = adam(self.discriminator.parameters(), optim["discriminator"])
        self.opt_g = adam(self.encoder.parameters(), optim["generator"])

    def __call__(self, x: torch.Tensor, noise: torch.Generator) -> None:
        self.opt_r.zero_grad()
        logits = self.decoder(self.encoder(x)["z"])
        F.mse_loss(torch.sigmoid(logits), x).backward()
        self.opt_r.step()

        self.opt_d.zero_grad()
        real = self.model.priors["z"].sample(x.shape[0], None, generator=noise, device=x.device)
        fake = self.encoder(x)["z"].detach()
        d_real, d_fake = self.discriminator(real), self.discriminator(fake)
        (
            F.binary_cross_entropy_with_logits(
                torch.cat([d_real, d_fake]).flatten(), torch.cat([torch.ones(len(x)), torch.zeros(len(x))])
            )
        ).backward()
        self.opt_d.step()

        self.opt_g.zero_grad()
        d_gen = self.discriminator(self.encoder(x)["z"])
        F.binary_cross_entropy_with_logits(d_gen, torch.ones_like(d_gen)).backward()
        self.opt_g.step()


def test_engine_step_equals_the_papers_schedule_written_by_hand(tmp_path):
    trainer = gaussian_trainer(tmp_path)
    reference = ReferenceStep(trainer)
    for _ in range(3):
        index = trainer.batches.take(20)
        x = trainer.train_data.inputs(index)
        noise = torch.Generator().set_state(trainer.noise.get_state())
        trainer.train_step(index)
        reference(x, noise)
    m = trainer.model
    pairs = [
        (m.encoder, reference.encoder),
        (m.decoder, reference.decoder),
        (m.discriminators["z"], reference.discriminator),
    ]
    for engine_part, reference_part in pairs:
        for (name, a), (_, b) in zip(engine_part.named_parameters(), reference_part.named_parameters()):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), name


def test_each_phase_updates_only_its_own_parts(tmp_path):
    trainer = gaussian_trainer(tmp_path, "run.mixed_precision=bf16")
    m = trainer.model

    def changed_parts(phase) -> set[str]:
        before = {k: v.detach().clone() for k, v in m.state_dict().items()}
        phase()
        return {k.split(".")[0] for k, v in m.state_dict().items() if not torch.equal(before[k], v)}

    index = trainer.batches.take(20)
    x, labels = trainer.train_data.inputs(index), trainer.train_data.y[index]
    assert changed_parts(lambda: trainer.reconstruction_phase(x, labels)) == {"encoder", "decoder"}
    assert changed_parts(lambda: trainer.regularization_phase(x, torch.full_like(labels, -1))) == {
        "encoder",
        "discriminators",
    }
    # after the generator step no discriminator parameter is left frozen
    assert all(p.requires_grad for p in m.discriminators.parameters())


FAULTS_PER_STEP = """
import resource, sys
sys.path.insert(0, "tests")
from test_schedule import gaussian_trainer
wide = [f"{part}.hidden=[512,512]" for part in ("encoder", "decoder", "codes.z.discriminator")]
trainer = gaussian_trainer(sys.argv[1], "run.mixed_precision=bf16", *wide)
for _ in range(5):
    trainer.train_step(trainer.batches.take(20))
windows = []  # the quietest of three windows: the heap may still grow once to a new peak
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        trainer.train_step(trainer.batches.take(20))
    windows.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
print(min(windows))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator setting")
def test_a_cpu_trainer_keeps_freed_blocks_in_the_process(tmp_path):
    """Training steps reuse freed blocks instead of faulting in fresh pages. In a fresh process, as `aaekit
    run` is; with glibc's default thresholds this bf16 step faults ~240 pages (4 KiB) a step, ~960 with 1000
    units."""
    try:
        _ = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    out = subprocess.run(
        [sys.executable, "-c", FAULTS_PER_STEP, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout
    assert float(out.strip().splitlines()[-1]) < 20
