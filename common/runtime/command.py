"""How every command of this project parses its options and reports the errors a user can fix.

A user error (a missing or empty data directory, a bad interaction file, a bad
option or config value, a port in use, too little memory for the markets asked
for) ends a command with one line on stderr, ``error: ...``, and exit status 2;
``--verbose`` adds the traceback. ``xmfl`` (``xmfl/cli.py``) and every module's
``python -m`` entry point go through :func:`run_command`. Like the rest of
``common/``, this module imports neither Flower nor torch, and it stays light
enough for ``xmfl --help``.
"""

import argparse
import errno
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

USER_ERROR_STATUS = 2
_renaming: tuple[str, str] | None = None  # (name in the code, name the user typed), inside invoked_as
INTERRUPTED_STATUS = 130
VERBOSE = "--verbose"


class UserError(Exception):
    """Something the user can fix: the message says what, in one sentence."""


class OptionError(UserError, ValueError):
    """An option's value cannot be used (found after parsing, so argparse could not refuse it)."""


class PortInUseError(UserError):
    """A port a command needs is taken by another process."""


class OutOfMemoryError(UserError):
    """The machine has too little free memory for what was asked."""


# Exceptions that are the user's to fix. A file or directory that does not exist, or
# cannot be read, comes from an option; common.data.InteractionFileError is a UserError.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, ``error: ... (see PROG --help)``, and exit status 2.

    Inside :func:`invoked_as`, a parser named ``python -m <module>[ ...]`` calls itself by the
    name the user typed (``xmfl <command>[ ...]``) in its usage, help and errors.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        prog = kwargs.get("prog")
        if _renaming is not None and isinstance(prog, str):
            old, new = _renaming
            if prog == old or prog.startswith(old + " "):
                kwargs["prog"] = new + prog[len(old) :]
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(USER_ERROR_STATUS, f"error: {one_line(message)} (see {self.prog} --help)\n")


@contextmanager
def invoked_as(module: str, name: str) -> Iterator[None]:
    """While the block runs, parsers of ``python -m <module>`` call themselves ``name`` (e.g. ``xmfl simulate``)."""
    global _renaming
    saved, _renaming = _renaming, (f"python -m {module}", name)
    try:
        yield
    finally:
        _renaming = saved


def add_verbose(parser: argparse.ArgumentParser, what: str = "") -> None:
    """``--verbose``: more output (``what``, if given) and the traceback of an error."""
    detail = f"{what}, and " if what else ""
    parser.add_argument(VERBOSE, action="store_true", help=f"show {detail}the traceback of an error (default: off)")


def one_line(message: object) -> str:
    """``message`` with its whitespace runs, line breaks included, as single spaces."""
    return " ".join(str(message).split())


def report_error(error: BaseException, verbose: bool) -> NoReturn:
    """Print ``error`` as one line on stderr (after its traceback when ``verbose``); exit with status 2."""
    if verbose:
        traceback.print_exception(error, file=sys.stderr)
    sys.stderr.flush()
    print(f"error: {one_line(error) or type(error).__name__}", file=sys.stderr, flush=True)
    sys.exit(USER_ERROR_STATUS)


def run_command(
    main: Callable[[list[str] | None], Any],
    argv: Sequence[str] | None = None,
    also: tuple[type[BaseException], ...] = (),
) -> Any:
    """Run a command's ``main(argv)``; a user error exits with one line and status 2, Ctrl-C with 130.

    Parameters
    ----------
    main : Callable
        The command's ``main``, which parses ``argv`` itself.
    argv : Sequence[str], optional
        The options; ``sys.argv[1:]`` when None. ``--verbose`` among them shows
        the traceback of a user error too.
    also : tuple of exception types
        Further exceptions that are the user's to fix in this command (a
        serving command's ``ValueError`` about a model or file it was given, say).

    Returns
    -------
    Any
        What ``main`` returned. Other exceptions propagate with their traceback:
        they are not the user's to fix.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        return main(arguments)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED_STATUS)
    except Exception as error:
        if not is_user_error(error, also):
            raise
        report_error(error, VERBOSE in arguments)


def is_user_error(error: BaseException, also: tuple[type[BaseException], ...] = ()) -> bool:
    """Whether ``error`` is the user's to fix: one of :data:`USER_ERRORS` or ``also``, or a port in use."""
    address_in_use = isinstance(error, OSError) and error.errno == errno.EADDRINUSE
    return isinstance(error, USER_ERRORS + also) or address_in_use


def add_alias(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """Let the deprecated spelling ``old`` of option ``new`` keep working, hidden from ``--help``.

    Raises
    ------
    ValueError
        If ``parser`` has no option ``new``.
    """
    action = parser._option_string_actions.get(new)
    if action is None:
        raise ValueError(f"The parser has no option {new}, so {old} cannot stand for it.")
    settings: dict[str, Any] = {"dest": action.dest, "default": argparse.SUPPRESS, "help": argparse.SUPPRESS}
    if action.nargs == 0:  # store_true and the like
        settings.update(action="store_const", const=action.const)
    else:
        settings.update(type=action.type, choices=action.choices, metavar=action.metavar, nargs=action.nargs)
        if isinstance(action, argparse._AppendAction):
            settings["action"] = "append"
    parser.add_argument(old, **settings)


def comma_list(text: str) -> list[str]:
    """``"de, fr,jp"`` -> ``["de", "fr", "jp"]``: the entries of a comma-separated option, empty ones dropped."""
    return [entry.strip() for entry in text.split(",") if entry.strip()]
