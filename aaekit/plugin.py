"""Everything a plugin author imports, in one place:

    from aaekit.plugin import Prior, Posterior, Dataset, Head, Param, hookimpl, UserError

The classes a component subclasses (:mod:`aaekit.contracts`), the declared parameters of its recipe keys
(:mod:`aaekit.params`), the hook marker (:mod:`aaekit.hookspecs`), the error for a user's mistake
(:mod:`aaekit.errors`), and small helpers: ``mlp`` for networks, ``ArrayData`` for what a dataset loads,
``CodeSpec`` for the codes a posterior or head is given, ``cache_dir`` for a dataset's converted files. Those
modules stay importable on their own; this one only gathers them.
"""

from aaekit.contracts import ArrayData, CodeSpec, Dataset, Head, Posterior, Prior, cache_dir
from aaekit.errors import PluginError, UserError
from aaekit.hookspecs import hookimpl
from aaekit.model import mlp
from aaekit.params import Param

__all__ = [
    "ArrayData",
    "CodeSpec",
    "Dataset",
    "Head",
    "Param",
    "PluginError",
    "Posterior",
    "Prior",
    "UserError",
    "cache_dir",
    "hookimpl",
    "mlp",
]
