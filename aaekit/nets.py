"""Kept so that plugins written against ``aaekit.nets`` keep working; new code imports ``mlp`` from
:mod:`aaekit.plugin` (it lives in :mod:`aaekit.model`)."""

from aaekit.model import mlp

__all__ = ["mlp"]
