"""Plugin loading: entry points (group "aaekit") and one-off plugin files, into registries by kind.

Loading is lazy and happens once. Each entry point is loaded in its own try/except, so one broken
plugin is reported (``aaekit plugins``) while the others keep working; ``AAEKIT_STRICT_PLUGINS=1``
makes a broken plugin fatal.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pluggy

from aaekit import hookspecs
from aaekit.errors import PluginError, UserError
from aaekit.params import did_you_mean

GROUP = "aaekit"
KINDS = ("prior", "posterior", "dataset", "head")
_HOOK_OF_KIND = {
    "prior": "register_priors",
    "posterior": "register_posteriors",
    "dataset": "register_datasets",
    "head": "register_heads",
}


@dataclass
class Registered:
    kind: str
    name: str
    cls: type
    plugin: str
    distribution: str
    version: str

    @property
    def summary(self) -> str:
        doc = (self.cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


@dataclass
class BrokenPlugin:
    plugin: str
    distribution: str
    error: str


@dataclass
class Registry:
    components: dict[str, dict[str, Registered]] = field(default_factory=lambda: {k: {} for k in KINDS})
    broken: list[BrokenPlugin] = field(default_factory=list)
    plugin_dirs: list[str] = field(default_factory=list)

    def get(self, kind: str, name: str) -> Registered:
        try:
            return self.components[kind][name]
        except KeyError:
            raise UserError(self.unknown(kind, name)) from None

    def unknown(self, kind: str, name: str) -> str:
        names = sorted(self.components[kind])
        message = (
            f"unknown {kind} {name!r}{did_you_mean(name, names)}; available: {', '.join(names) or 'none'}"
        )
        if self.broken:  # the component may be one of theirs: say which plugin broke and why
            causes = "; ".join(f"{b.plugin} ({b.distribution}): {b.error}" for b in self.broken)
            message += f". A plugin failed to load and may provide it: {causes}; fix or reinstall it"
        return message


_registry: Registry | None = None
_loaded_dirs: tuple[str, ...] | None = None


def _strict() -> bool:
    return os.environ.get("AAEKIT_STRICT_PLUGINS", "") not in ("", "0", "false", "no")


def _plugin_dirs(extra: list[str] | None) -> list[str]:
    dirs = list(extra or [])
    env = os.environ.get("AAEKIT_PLUGINS_DIR")
    if env:
        dirs += [d for d in env.split(os.pathsep) if d]
    return dirs


def get_registry(plugins_dirs: list[str] | None = None) -> Registry:
    """Load every plugin once (again only when the set of plugin directories changes)."""
    global _registry, _loaded_dirs
    dirs = tuple(_plugin_dirs(plugins_dirs))
    if _registry is None or dirs != _loaded_dirs:
        _registry = _load(list(dirs))
        _loaded_dirs = dirs
    return _registry


def reset() -> None:
    """Forget loaded plugins (tests use this to load a fresh set)."""
    global _registry, _loaded_dirs
    _registry = None
    _loaded_dirs = None


def _load(plugin_dirs: list[str]) -> Registry:
    registry = Registry(plugin_dirs=plugin_dirs)
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    sources: dict[str, tuple[str, str]] = {}  # plugin name -> (distribution, version)

    def broken(plugin: str, distribution: str, exc: BaseException) -> None:
        error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        if _strict():
            raise PluginError(
                f"plugin {plugin!r} from {distribution} failed to load: {error} "
                "(AAEKIT_STRICT_PLUGINS is set; unset it to skip broken plugins)"
            )
        registry.broken.append(BrokenPlugin(plugin, distribution, error))

    for ep in importlib.metadata.entry_points(group=GROUP):
        dist = ep.dist.name if ep.dist is not None else "?"
        version = ep.dist.version if ep.dist is not None else "?"
        plugin_name = f"{dist}:{ep.name}"
        try:
            module = ep.load()
            pm.register(module, name=plugin_name)
        except Exception as exc:  # a plugin's import error must not take the others down
            broken(plugin_name, dist, exc)
            continue
        sources[plugin_name] = (dist, version)

    for directory in plugin_dirs:
        path = Path(directory)
        if not path.is_dir():
            raise UserError(f"--plugins-dir {directory}: not a directory; give a folder of plugin .py files")
        for file in sorted(path.glob("*.py")):
            plugin_name = f"file:{file}"
            try:
                spec = importlib.util.spec_from_file_location(f"aaekit_plugin_{file.stem}", file)
                module = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = module
                spec.loader.exec_module(module)
                pm.register(module, name=plugin_name)
            except Exception as exc:
                broken(plugin_name, str(file), exc)
                continue
            sources[plugin_name] = (str(file), "-")

    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        hooks = ", ".join(_HOOK_OF_KIND.values())
        name = pm.get_name(exc.plugin) or repr(exc.plugin)
        raise PluginError(
            f"plugin {name!r}: {exc}. Known hooks: {hooks}; check the spelling of the function name"
        ) from None

    for kind, hook_name in _HOOK_OF_KIND.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            dist, version = sources.get(impl.plugin_name, ("?", "?"))

            def register(cls, _kind=kind, _plugin=impl.plugin_name, _dist=dist, _version=version):
                _register(registry, _kind, cls, _plugin, _dist, _version)

            try:
                impl.function(register=register)
            except PluginError:
                raise
            except Exception as exc:
                broken(impl.plugin_name, dist, exc)
    return registry


def _register(registry: Registry, kind: str, cls, plugin: str, dist: str, version: str) -> None:
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not name:
        raise PluginError(f"plugin {plugin!r} registered a {kind} class {cls!r} without a `name` attribute")
    existing = registry.components[kind].get(name)
    if existing is not None:
        raise PluginError(
            f"{kind} {name!r} is registered twice: by plugin {existing.plugin!r} ({existing.distribution}) "
            f"and by plugin {plugin!r} ({dist}); uninstall one or rename its {kind}"
        )
    registry.components[kind][name] = Registered(kind, name, cls, plugin, dist, version)
