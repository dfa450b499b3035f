"""``xmfl``: one command for everything a user of xmarket-fl does.

    xmfl simulate --synthetic-markets 2 --num-server-rounds 1 --out OUT
    xmfl <command> --help

Each command runs a module exactly as ``python -m <module>`` does (which keeps
working), with ``xmfl <command>`` as its name in usage and errors. Modules are
imported only when their command runs, so ``xmfl --help`` is quick. An error the
user can fix ends in one line, ``error: ...``, and exit status 2
(:mod:`common.runtime.command`); ``--verbose`` adds its traceback.
"""

import argparse
import runpy
import sys
import warnings
from collections.abc import Sequence
from typing import NamedTuple

from common.runtime.command import ArgumentParser, UserError, invoked_as, run_command

PROG = "xmfl"


class Command(NamedTuple):
    """A subcommand: the module it runs and its line in ``xmfl --help``."""

    module: str
    summary: str


COMMANDS: dict[str, Command] = {
    "simulate": Command("simulations.run", "simulate markets here: federated methods beside baselines"),
    "privacy-sweep": Command(
        "simulations.benchmarks.privacy_sweep", "federated quality against each market's DP budget"
    ),
    "benchmark": Command("simulations.benchmark", "quality, scale, serving, attacks, refit, join, continue, ..."),
    "tune": Command("simulations.tune", "search fedals' settings, each trial a federated training"),
    "ials-tuning": Command("simulations.benchmarks.ials_tuning", "tune fedals' iALS settings on validation"),
    "catalog": Command("deploy.catalog", "write the company catalog from a product list or market files"),
    "credentials": Command("deploy.make_credentials", "server host: the SuperLink's TLS certificate and key (dev CA)"),
    "region-keys": Command("deploy.region_keys", "a region, on its machine: its SuperNode key pair"),
    "app-keys": Command("deploy.app_keys", "release manager, offline: the app-signing key pair"),
    "sign-app": Command("deploy.sign_app", "release manager, offline: sign the app for the server host"),
    "app": Command("xmfl.app", "write the Flower app to a directory, for flwr run or flwr build"),
    "app-index": Command("deploy.app_index", "server host: serve the offline-signed app to the SuperLink"),
    "recommend": Command("clients.recommend", "top-K recommendations per user from a served model"),
    "score": Command("clients.score", "score (user, item) pairs with a served model"),
    "models": Command("clients.models", "a region's model of each training, and the one it serves"),
    "join": Command("clients.join", "a late market fits its head on a training's shared part"),
    "ledger": Command("clients.ledger", "show a region's DP ledger, or start a new budget period"),
}


def parser() -> argparse.ArgumentParser:
    """``xmfl``'s own parser: the command; everything after it is the command's to parse."""
    width = max(map(len, COMMANDS)) + 2
    listing = "\n".join(f"  {name:<{width}}{command.summary}" for name, command in COMMANDS.items())
    top = ArgumentParser(
        prog=PROG,
        description="Federated cross-market recommendation (xmarket-fl).\n\ncommands:\n" + listing,
        epilog=f"'{PROG} COMMAND --help' shows the command's options, each with its default.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("command", metavar="COMMAND", choices=list(COMMANDS), help="one of the commands above")
    top.add_argument("arguments", metavar="...", nargs=argparse.REMAINDER, help="the command's options")
    return top


# Modules that only an extra installs, and the extra (pyproject.toml's optional-dependencies).
EXTRA_OF_MODULE = {
    "ray": "simulation",
    "matplotlib": "simulation",
    "tomli_w": "simulation",
    "optuna": "simulation",
    "implicit": "benchmark",
}


def run(name: str, argv: Sequence[str]) -> None:
    """Run command ``name``'s module as ``__main__`` with ``argv``, as ``python -m`` would.

    Raises
    ------
    UserError
        If the command needs a module that only one of the package's extras installs.
    """
    module = COMMANDS[name].module
    saved_argv = sys.argv
    sys.argv = [f"{PROG} {name}", *argv]  # argv[0] names the parsers that take their name from it
    try:
        with invoked_as(module, f"{PROG} {name}"), warnings.catch_warnings():
            # Expected when the module was imported before (tests do): runpy runs a fresh copy as __main__.
            warnings.filterwarnings(
                "ignore", message=".*found in sys.modules after import of package", category=RuntimeWarning
            )
            runpy.run_module(module, run_name="__main__", alter_sys=False)
    except ModuleNotFoundError as error:
        extra = EXTRA_OF_MODULE.get((error.name or "").split(".")[0])
        if extra is None:
            raise
        raise UserError(
            f"{PROG} {name} needs the '{extra}' extra (module '{error.name}' is missing): "
            f"pip install 'xmarket-fl[{extra}]'"
        ) from error
    finally:
        sys.argv = saved_argv


def main(argv: Sequence[str] | None = None) -> None:
    """``xmfl COMMAND [ARGS...]``; exits with the command's status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    top = parser()
    if not argv:
        top.error(f"a COMMAND is required; '{PROG} --help' lists them")
    if argv[0] not in COMMANDS:
        top.parse_args(argv[:1])  # prints the help, or one line naming the unknown command, and exits
    run_command(lambda arguments: run(argv[0], arguments), argv[1:])


if __name__ == "__main__":
    main()
