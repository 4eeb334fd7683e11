"""What a run watches in its logged metrics and tells the user: a loss that diverged (the run stops), one side
of a discriminator winning for long (a warning), a loss heading for inf (a warning, repeated at the end); and
what it says when the machine runs out of memory."""

from __future__ import annotations

import math

import torch

from aaekit.errors import TrainingStopped

# Losses warned about: this many times the first logged value (and at least this large), or past ABSURD_LOSS
# (squared errors of values near 1e10: no data set's scale, but a bf16/fp32 run on its way to inf).
GROWTH_WARNING = 1e4
ABSURD_LOSS = 1e20


class Monitor:
    def __init__(self, codes, imbalance_warning_steps: int, say=print):
        self.say = say
        self.limit = imbalance_warning_steps
        # steps each code's game has been one-sided (saved in checkpoints)
        self.imbalance = {c: 0 for c in codes}
        self.warned_imbalance: set[str] = set()
        self.first_losses: dict[str, float] = {}
        self.growth_warnings: dict[str, str] = {}

    def check(self, values: dict, steps: int, step: int, last_good: str | None) -> None:
        """One log window's means (``steps`` steps ending at ``step``)."""
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            raise TrainingStopped(
                f"loss diverged (non-finite {', '.join(bad)}) by step {step}; stopped. The last good "
                f"checkpoint "
                f"is kept: {last_good or 'none yet'}. Lower the learning rates in [optim.*] or use "
                'run.mixed_precision = "no".',
                exit_code=3,
            )
        self.check_imbalance(values, steps)
        self.check_growth(values, step)

    def check_imbalance(self, values: dict, steps: int) -> None:
        """Warn once per code when one side of its discriminator wins for a long stretch: the discriminator
        right on 90 % of prior samples and codes together (a gmm_label run whose codes never reached the prior
        sat at 94-96 % from step 300 on; healthy runs stay near 60-75 %), or codes passing for prior samples
        99 % of the time."""
        for code in self.imbalance:
            prior_acc, code_acc = values.get(f"accuracy/prior.{code}"), values.get(f"accuracy/code.{code}")
            if prior_acc is None:
                continue
            d_wins = (prior_acc + code_acc) / 2 >= 0.9
            g_wins = code_acc < 0.01
            self.imbalance[code] = self.imbalance[code] + steps if (d_wins or g_wins) else 0
            if self.limit and self.imbalance[code] >= self.limit and code not in self.warned_imbalance:
                self.warned_imbalance.add(code)
                side = "discriminator" if d_wins else "encoder (generator)"
                self.say(
                    f"warning: for code {code!r} the {side} has been winning for {self.imbalance[code]} "
                    f"steps; "
                    "the codes are probably not matching the prior. Balance the learning rates of "
                    "[optim.discriminator] and [optim.generator] (or the discriminator's size)."
                )

    def check_growth(self, values: dict, step: int) -> None:
        """Warn once per loss that grows far past where it started (a run heading for divergence in bf16
        reaches 1e30 before it reaches inf)."""
        for key, value in values.items():
            if not key.startswith("loss/"):
                continue
            first = self.first_losses.setdefault(key, abs(value))
            huge = abs(value) > GROWTH_WARNING * max(first, 1.0) or abs(value) > ABSURD_LOSS
            if huge and key not in self.growth_warnings:
                self.growth_warnings[key] = (
                    f"{key} reached {value:.3g} by step {step} (first logged: {first:.3g}); the run is "
                    f"probably "
                    "diverging: lower the learning rates in [optim.*] and check the data's scale"
                )
                self.say(f"warning: {self.growth_warnings[key]}")

    def repeat_warnings(self) -> None:
        """At the end of a run, so that an exit 0 does not hide them."""
        for warning in self.growth_warnings.values():
            self.say(f"warning: {warning}")


def is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text)
    )


def out_of_memory_message(exc: BaseException, recipe) -> str:
    """Name what asked for the memory: the allocation that failed, and the sizes of the recipe that drive
    it."""
    values = recipe.values
    wanted = next(
        (part.strip() for part in str(exc).replace(";", ".").split(". ") if "allocate" in part),
        "an allocation failed",
    )
    discs = ", ".join(
        f"codes.{c}.discriminator.hidden = {code['discriminator']['hidden']}"
        for c, code in values["codes"].items()
    )
    return (
        f"{recipe.path}: out of memory ({wanted}) with train.batch_size = {values['train']['batch_size']}, "
        f"encoder.hidden = {values['encoder']['hidden']}, decoder.hidden = {values['decoder']['hidden']}, "
        f"{discs}, data.in_memory = {values['data']['in_memory']!r}; lower these sizes (or set "
        "data.in_memory = false to stream the data)"
    )
