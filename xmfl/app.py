"""Where the Flower app and its defaults are: the checkout, or the installed package.

``flwr run`` takes a directory holding ``pyproject.toml`` (``[tool.flwr.app]``)
and the packages its ``fab-include`` names. In a checkout (an editable install
or ``python -m`` from the checkout) that directory is the checkout itself. A
wheel installs the packages into site-packages and carries a copy of the
checkout's ``pyproject.toml`` as ``xmfl/pyproject.toml``, written by the build
(``setup.py``), never by hand: ``pyproject.toml`` stays the one place the
app's config defaults (``[tool.flwr.app.config]``) are written.
:func:`app_dir` then lays out the app from the installed files in a temporary
directory, once per process.

Standard library only: the harness, the deployment helpers and the ``xmfl``
command import it before anything heavy. As a command it writes the app to a
directory of one's own, for ``flwr run DIR`` or ``flwr build``:

    xmfl app --out DIR
"""

import argparse
import atexit
import importlib.util
import shutil
import tempfile
import tomllib
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from common.runtime.command import ArgumentParser, run_command

PROJECT = "xmarket-fl"  # [project] name: tells this project's pyproject.toml from any other
PROJECT_FILE = "pyproject.toml"


def checkout() -> Path | None:
    """The checkout these packages were imported from, or None when they are installed from a wheel."""
    root = Path(__file__).resolve().parents[1]
    path = root / PROJECT_FILE
    if path.is_file():
        try:
            project = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError):
            return None
        if project.get("project", {}).get("name") == PROJECT and "app" in project.get("tool", {}).get("flwr", {}):
            return root
    return None


@cache
def _project_text() -> str:
    root = checkout()
    if root is not None:
        return (root / PROJECT_FILE).read_text(encoding="utf-8")
    packaged = resources.files(__package__).joinpath(PROJECT_FILE)
    if not packaged.is_file():
        raise FileNotFoundError(
            f"Neither a checkout's {PROJECT_FILE} nor the copy a wheel of {PROJECT} carries "
            f"({packaged}) was found; reinstall the package "
            "(pip install xmarket-fl, or pip install -e . in a checkout)."
        )
    return packaged.read_text(encoding="utf-8")


def project() -> dict[str, Any]:
    """The app's ``pyproject.toml``, parsed (a fresh copy each call)."""
    return tomllib.loads(_project_text())


def app_config() -> dict[str, Any]:
    """``[tool.flwr.app.config]``: the app's run config defaults (a fresh dict each call)."""
    return project()["tool"]["flwr"]["app"]["config"]


def app_packages() -> list[str]:
    """The packages the app (FAB) ships: the first path segment of each ``fab-include`` pattern."""
    patterns = project()["tool"]["flwr"]["app"]["fab-include"]
    return sorted({pattern.split("/", 1)[0] for pattern in patterns})


@cache
def app_dir() -> Path:
    """The directory ``flwr run`` submits and ``flwr build`` builds: the checkout, or a copy of the installed app.

    The copy (``pyproject.toml`` plus the packages of :func:`app_packages`) is
    made once per process in a temporary directory, removed when the process exits.
    """
    root = checkout()
    if root is not None:
        return root
    target = Path(tempfile.mkdtemp(prefix=f"{PROJECT}-app-"))
    atexit.register(shutil.rmtree, target, ignore_errors=True)
    write_app(target)
    return target


def write_app(target: Path) -> None:
    """Write the app, ``pyproject.toml`` and the packages of :func:`app_packages`, into the directory ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    (target / PROJECT_FILE).write_text(_project_text(), encoding="utf-8")
    for package in app_packages():
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"The app's package '{package}' is not installed; reinstall {PROJECT}.")
        source = Path(next(iter(spec.submodule_search_locations)))
        shutil.copytree(source, target / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def main(argv: list[str] | None = None) -> None:
    """``xmfl app --out DIR``: write the app where the user can run or build it."""
    parser = ArgumentParser(
        prog="python -m xmfl.app", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="directory to write pyproject.toml and the app's packages to; it must not exist yet "
        "or be empty (required)",
    )
    args = parser.parse_args(argv)
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        parser.error(f"{args.out} exists and is not an empty directory; give a new one")
    write_app(args.out)
    print(f"Wrote the {PROJECT} app to {args.out}: flwr run {args.out} <connection>, or flwr build --app {args.out}")


if __name__ == "__main__":
    run_command(main)
