"""The whole plugin contract: each hook hands the plugin a ``register`` callable."""

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("aaekit")
hookimpl = HookimplMarker("aaekit")


@hookspec
def register_priors(register):
    """Register Prior classes: ``register(MyPrior)``."""


@hookspec
def register_posteriors(register):
    """Register Posterior (encoder) classes: ``register(MyPosterior)``."""


@hookspec
def register_datasets(register):
    """Register Dataset classes: ``register(MyDataset)``."""


@hookspec
def register_heads(register):
    """Register Head classes: ``register(MyHead)``."""
