"""Plugin loading: entry points, one-off files, broken plugins, misspelt hooks, duplicate names, the README
example."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from aaekit import plugins
from aaekit.errors import PluginError
from conftest import ROOT, aaekit

PRIOR_FILE = '''
import torch
from aaekit.contracts import Prior
from aaekit.hookspecs import hookimpl
from aaekit.params import Param


class {cls}(Prior):
    """{doc}"""
    name = "{name}"
    params = {{"scale": Param(float, 1.0, min=0)}}

    def __init__(self, dim, scale=1.0):
        super().__init__(dim)
        self.scale = scale

    def sample(self, n, labels=None, *, generator=None, device="cpu"):
        return self.scale * torch.rand(n, self.dim, generator=generator, device=device)


@hookimpl
def {hook}(register):
    register({cls})
'''


def write_prior(
    folder: Path, stem: str, name: str, hook: str = "register_priors", cls: str = "FilePrior"
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.py"
    path.write_text(PRIOR_FILE.format(cls=cls, name=name, hook=hook, doc=f"test prior {name}"))
    return path


def fake_distribution(site: Path, dist: str, module: str, source: str) -> None:
    """A real installed distribution as pip would leave it: module + .dist-info with entry_points.txt."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(source)
    info = site / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[aaekit]\n{module} = {module}\n")


@pytest.fixture(autouse=True)
def fresh_registry():
    plugins.reset()
    yield
    plugins.reset()


def test_builtins_come_through_entry_points():
    registry = plugins.get_registry()
    for kind, name in [
        ("prior", "gaussian"),
        ("prior", "gmm"),
        ("posterior", "universal"),
        ("dataset", "mnist"),
        ("head", "classifier"),
    ]:
        entry = registry.get(kind, name)
        assert entry.distribution == "aaekit-builtins", entry
        assert entry.plugin.startswith("aaekit-builtins:")
    assert registry.broken == []


COUNTING_PLUGIN = """
import os
from aaekit.hookspecs import hookimpl

LOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "events.txt")
with open(LOG, "a") as fh:
    fh.write("imported\\n")


@hookimpl
def register_priors(register):
    with open(LOG, "a") as fh:
        fh.write("registered\\n")
"""

LAZY_AND_ONCE = """
import sys
from pathlib import Path

import aaekit, aaekit.api, aaekit.cli, aaekit.engine, aaekit.plugins, aaekit.recipe
log = Path(sys.argv[1]) / "events.txt"
assert not log.exists(), "a plugin was loaded by importing aaekit"
assert not [m for m in sys.modules if m.startswith("aaekit_builtins")], "the built-in plugins were imported"
first = aaekit.plugins.get_registry()
assert "aaekit_builtins" in sys.modules and "gaussian" in first.components["prior"]
assert aaekit.plugins.get_registry() is first
aaekit.recipe.load_recipe("recipes/gaussian.toml")  # a user of the registry, loading nothing again
print(log.read_text().split())
"""


def test_loading_is_lazy_and_once(tmp_path):
    """Importing aaekit (CLI, API, engine) loads no plugin; the first get_registry() loads each once (the
    module imported once, its hook called once), and later calls return the same registry. In a fresh
    interpreter, with a one-off plugin file that logs when it is imported and when its hook runs."""
    (tmp_path / "counting.py").write_text(COUNTING_PLUGIN)
    out = subprocess.run(
        [sys.executable, "-c", LAZY_AND_ONCE, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "AAEKIT_PLUGINS_DIR": str(tmp_path)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "['imported', 'registered']", out.stdout


def test_one_off_plugin_file(tmp_path):
    write_prior(tmp_path / "p", "my_prior", "from_file")
    registry = plugins.get_registry([str(tmp_path / "p")])
    assert registry.get("prior", "from_file").distribution.endswith("my_prior.py")
    assert "gaussian" in registry.components["prior"]  # the others still load

    out = aaekit("plugins", "--plugins-dir", str(tmp_path / "p"))
    assert out.returncode == 0, out.stderr
    assert "from_file" in out.stdout


def test_plugins_dir_from_environment(tmp_path, monkeypatch):
    write_prior(tmp_path / "p", "env_prior", "from_env")
    monkeypatch.setenv("AAEKIT_PLUGINS_DIR", str(tmp_path / "p"))
    assert "from_env" in plugins.get_registry().components["prior"]


def test_broken_entry_point_is_reported_and_others_work(tmp_path):
    site = tmp_path / "site"
    fake_distribution(site, "aaekit-broken", "aaekit_broken_plugin", "import no_such_module_anywhere\n")
    env = {"PYTHONPATH": str(site)}
    out = aaekit("plugins", env=env)
    assert out.returncode == 0, out.stderr
    assert "aaekit-broken" in out.stdout and "no_such_module_anywhere" in out.stdout
    assert "gaussian" in out.stdout
    ok = aaekit("validate", str(ROOT / "recipes" / "gaussian.toml"), env=env)
    assert ok.returncode == 0, ok.stderr

    strict = aaekit("plugins", env={**env, "AAEKIT_STRICT_PLUGINS": "1"})
    assert strict.returncode == 2
    assert "aaekit-broken" in strict.stderr and "AAEKIT_STRICT_PLUGINS" in strict.stderr
    assert "Traceback" not in strict.stderr


def test_working_third_party_entry_point(tmp_path):
    site = tmp_path / "site"
    fake_distribution(
        site,
        "aaekit-thirdparty",
        "aaekit_thirdparty_prior",
        PRIOR_FILE.format(cls="ThirdParty", name="thirdparty", hook="register_priors", doc="third"),
    )
    out = aaekit("plugins", env={"PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if "thirdparty" in line)
    assert "aaekit-thirdparty" in line and "1.2.3" in line


def test_misspelt_hook_names_the_plugin(tmp_path):
    write_prior(tmp_path / "p", "typo", "typo_prior", hook="register_prior")
    with pytest.raises(PluginError, match=r"typo\.py.*register_prior"):
        plugins.get_registry([str(tmp_path / "p")])
    out = aaekit("plugins", "--plugins-dir", str(tmp_path / "p"))
    assert out.returncode == 2 and "register_prior" in out.stderr and "Traceback" not in out.stderr


def test_duplicate_name_names_both_plugins(tmp_path):
    write_prior(tmp_path / "p", "clash", "gaussian")
    with pytest.raises(PluginError) as info:
        plugins.get_registry([str(tmp_path / "p")])
    message = str(info.value)
    assert "aaekit-builtins" in message and "clash.py" in message and "'gaussian'" in message


def test_unknown_component_lists_names_and_suggests(tmp_path):
    registry = plugins.get_registry()
    message = registry.unknown("prior", "gausian")
    assert "did you mean 'gaussian'" in message and "gmm" in message
