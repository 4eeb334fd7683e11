"""aaekit: Adversarial Autoencoders as plugins, recipes and one engine.

Importing this package is cheap (no torch); heavy parts load on first use.
"""

__version__ = "0.1.0"


def load(run_dir, **options):
    """Rebuild a trained model from a run directory; ``checkpoint="latest"`` (or a step) takes a checkpoint's
    weights, ``device=`` places it (see :func:`aaekit.api.load`)."""
    from aaekit.api import load as _load

    return _load(run_dir, **options)
