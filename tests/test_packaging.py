"""The generic package names resolve to this repository, not to something installed."""

import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("package", ["common", "server", "clients", "simulations", "deploy"])
def test_imported_packages_are_this_repositorys(package):
    module = importlib.import_module(package)

    assert Path(module.__file__).resolve().parent == REPO / package


def test_common_never_imports_flower():
    sources = (REPO / "common").glob("*.py")

    offenders = [path.name for path in sources if "flwr" in path.read_text(encoding="utf-8")]

    assert offenders == []
