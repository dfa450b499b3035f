"""Packaging: the generic package names resolve to this repository, and the metadata tells the truth.

``requires-python`` admits this interpreter and no version the code or its
dependencies cannot run on; a region's installation (no extras) holds every
library the region's code imports, and neither Ray nor matplotlib.
"""

import ast
import importlib
import platform
import sys
import tomllib
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from tests.paths import REPO
from xmfl import app

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
LOCAL = set(
    tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"]["find"][
        "include"
    ]
)


@pytest.mark.parametrize("package", ["common", "server", "clients", "simulations", "deploy", "xmfl"])
def test_imported_packages_are_this_repositorys(package):
    module = importlib.import_module(package)

    assert Path(module.__file__).resolve().parent == REPO / package


def test_common_never_imports_flower():
    sources = sorted((REPO / "common").rglob("*.py"))

    offenders = [str(path.relative_to(REPO)) for path in sources if "flwr" in path.read_text(encoding="utf-8")]

    assert len(sources) > 30 and offenders == []


def test_the_app_of_a_checkout_is_the_checkout_with_its_own_config():
    assert app.checkout() == REPO
    assert app.app_dir() == REPO
    assert app.app_config() == tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    # The command is installed with the package, but it is not part of the Flower app.
    assert "xmfl" in LOCAL and "xmfl" not in app.app_packages()
    assert set(app.app_packages()) < LOCAL


def test_requires_python_admits_this_interpreter_and_nothing_older_than_the_code_and_dependencies_need():
    ours = SpecifierSet(PROJECT["requires-python"])

    assert platform.python_version() in ours
    assert "3.10.14" not in ours  # tomllib is 3.11's
    # Every installed dependency runs on every Python version we admit.
    for requirement in map(Requirement, PROJECT["dependencies"]):
        theirs = metadata.metadata(requirement.name).get("Requires-Python")
        for version in ("3.11.0", "3.12.0", "3.13.0"):
            if version in ours and theirs:
                assert version in SpecifierSet(theirs), (requirement.name, theirs, version)


@cache
def closure(extras: tuple[str, ...]) -> frozenset[str]:
    """Canonical names of the installed distributions ``pip install xmarket-fl[extras]`` brings in."""
    wanted = [Requirement(text) for text in PROJECT["dependencies"]]
    for extra in extras:
        wanted += [Requirement(text) for text in PROJECT["optional-dependencies"][extra]]
    found: set[str] = set()
    while wanted:
        requirement = wanted.pop()
        name = canonicalize_name(requirement.name)
        if name == canonicalize_name(PROJECT["name"]):
            # Our own extras (benchmark brings simulation): expand them here.
            for extra in requirement.extras:
                wanted += [Requirement(text) for text in PROJECT["optional-dependencies"][extra]]
            continue
        key = f"{name}[{','.join(sorted(requirement.extras))}]"
        if key in found:
            continue
        found.update({key, name})
        for text in metadata.requires(requirement.name) or []:
            child = Requirement(text)
            active = [""] + sorted(requirement.extras)
            if child.marker is None or any(
                child.marker.evaluate({**default_environment(), "extra": extra}) for extra in active
            ):
                wanted.append(child)
    return frozenset(name for name in found if "[" not in name)


def third_party_imports(packages: list[str]) -> dict[str, str]:
    """Top-level modules the packages' sources import (at any depth), mapped to a file that imports each."""
    imported: dict[str, str] = {}
    for package in packages:
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in LOCAL:
                        imported.setdefault(top, str(path.relative_to(REPO)))
    return imported


@pytest.mark.parametrize(
    ("packages", "extras"),
    [
        (["common", "server", "clients", "deploy", "xmfl"], ()),  # a region or the server: no extras
        (["simulations"], ("simulation", "benchmark")),
    ],
)
def test_every_import_is_installed_by_the_extras_of_whoever_runs_it(packages, extras):
    distributions = metadata.packages_distributions()
    installed = closure(extras)

    missing = {
        module: source
        for module, source in third_party_imports(packages).items()
        if not {canonicalize_name(d) for d in distributions.get(module, [module])} & installed
    }

    assert missing == {}


def test_a_region_installs_neither_ray_nor_matplotlib_and_the_simulation_extra_does():
    assert not {"ray", "matplotlib"} & closure(())
    assert {"ray", "matplotlib"} <= closure(("simulation",))
    # pip install -e ".[test]" installs everything the suite needs, the benchmark references included.
    assert closure(("simulation", "benchmark")) <= closure(("test",)) and "implicit" in closure(("test",))
