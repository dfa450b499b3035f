"""``pip install .`` from a wheel: the installed ``xmfl simulate`` runs without the checkout.

The wheel is built from a copy of the sources, installed without dependencies
into a fresh virtual environment, and run from a directory outside the
checkout. Installing torch, Flower and Ray again would take minutes, so the
fresh environment sees the test environment's site-packages through a path
line in a ``.pth`` file: that adds the directory but does not run the ``.pth``
files in it, so the test environment's editable install of this project (a
finder loaded from a ``.pth`` file) does not leak in; the test checks that
the packages are imported from the fresh environment.
"""

import email.parser
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from tests.paths import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))

pytestmark = pytest.mark.slow  # builds and installs a wheel, then a real simulation (tests/README.md)
# The top-level packages the wheel ships ("common.*" in packages.find adds common's subpackages).
TOP_PACKAGES = sorted({name.split(".")[0] for name in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]})


def run(command: list, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """Run a command; a failure shows its output."""
    finished = subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        **kwargs,
    )
    assert finished.returncode == 0, (
        f"{command} exited {finished.returncode}:\n{finished.stdout[-4000:]}\n{finished.stderr[-4000:]}"
    )
    return finished


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel ``pip install .`` would build, from a copy of the checkout's sources (the build writes beside them)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for package in TOP_PACKAGES:
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--wheel-dir",
            root / "dist",
            source,
        ],
        timeout=300,
    )
    (built,) = (root / "dist").glob("xmarket_fl-*.whl")
    return built


def test_the_wheel_carries_the_app_config_and_the_command_but_not_the_tests(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        app_file = archive.read("xmfl/pyproject.toml").decode("utf-8")
        (metadata_name,) = [name for name in names if name.endswith(".dist-info/METADATA")]
        wheel_metadata = email.parser.Parser().parsestr(archive.read(metadata_name).decode("utf-8"))
        (entry_points_name,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
        entry_points = archive.read(entry_points_name).decode("utf-8")

    # The copy is the build's, of the one hand-written file: the same app, config defaults and all.
    assert tomllib.loads(app_file)["tool"]["flwr"] == PYPROJECT["tool"]["flwr"]
    assert wheel_metadata["Requires-Python"] == PYPROJECT["project"]["requires-python"]
    assert "xmfl = xmfl.cli:main" in entry_points
    assert {name.split("/")[0] for name in names if "/" in name and ".dist-info" not in name} == set(TOP_PACKAGES)
    # The subpackages too (packages.find lists them as "common.*").
    assert {"common/ials/core.py", "common/serving/query.py", "simulations/benchmarks/command.py"} <= set(names)


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment holding the wheel, with this environment's dependencies visible; its bin dir."""
    venv = tmp_path_factory.mktemp("venv") / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], timeout=120)
    python = venv / "bin" / "python"
    run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", "--no-index", wheel],
        timeout=300,
    )
    # Only after the install: pip must not see this environment's editable install of the same project.
    paths = sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})
    Path(paths["purelib"], "test-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # Flower's commands (the SuperLink starts some by name), run by the fresh environment's interpreter.
    for entry_point in metadata.distribution("flwr").entry_points.select(group="console_scripts"):
        module, _, attribute = entry_point.value.partition(":")
        script = venv / "bin" / entry_point.name
        script.write_text(f"#!{python}\nimport sys\nfrom {module} import {attribute}\nsys.exit({attribute}())\n")
        script.chmod(0o755)
    return venv / "bin"


def clean_environment(bin_dir: Path) -> dict[str, str]:
    """This process's environment with the fresh one's bin first, no PYTHONPATH and one BLAS thread."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(
        PATH=os.pathsep.join([str(bin_dir), env.get("PATH", "")]),
        OMP_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        VIRTUAL_ENV=str(bin_dir.parent),
    )
    return env


def test_installed_packages_come_from_the_fresh_environment_not_the_checkout(installed, tmp_path):
    code = (
        "import common, simulations, xmfl.app; print(common.__file__); print(simulations.__file__); "
        "print(xmfl.app.checkout()); print(xmfl.app.app_config()['num-server-rounds'])"
    )

    lines = run(
        [installed / "python", "-c", code], timeout=120, cwd=tmp_path, env=clean_environment(installed)
    ).stdout.splitlines()

    site_packages = installed.parent / "lib"
    assert all(Path(line).resolve().is_relative_to(site_packages.resolve()) for line in lines[:2]), lines
    assert lines[2:] == ["None", str(PYPROJECT["tool"]["flwr"]["app"]["config"]["num-server-rounds"])]


def test_installed_xmfl_simulate_runs_two_generated_markets_outside_the_checkout(installed, tmp_path):
    env = clean_environment(installed)
    assert "simulate" in run([installed / "xmfl", "--help"], timeout=60, cwd=tmp_path, env=env).stdout

    finished = run(
        # popular: the in-process baseline that trains nothing; fedavg: the app, through Flower's simulation engine.
        [
            installed / "xmfl",
            "simulate",
            "--methods",
            "popular,fedavg",
            "--num-server-rounds",
            "1",
            "--synthetic-markets",
            "2",
            "--out",
            "run",
        ],
        timeout=600,
        cwd=tmp_path,
        env=env,
    )

    results = tmp_path / "run" / "results.json"
    assert results.exists(), finished.stdout[-3000:]
    methods = json.loads(results.read_text())["methods"]
    assert {"popular", "fedavg"} <= set(methods)
    assert all(0 < methods[method]["macro"]["ndcg@10"] <= 1 for method in ("popular", "fedavg"))
    # The app Flower ran was the installed one, laid out in a temporary directory and removed at exit.
    log = (tmp_path / "run" / "logs" / "fedavg.log").read_text()
    assert "Successfully installed xmarket-fl" in log
    assert [package for package in ("common", "server", "clients") if f"{REPO / package}/" in log] == []
