"""Running ``xmfl`` in this process, as its users do: its help texts, and the one-line errors it ends with."""

import re

import pytest

from xmfl import cli

# An option's help ends with its default, or says that it is required (alone or as one of a group).
ENDS_WITH_DEFAULT = re.compile(r"\((default|required)\b[^()]*(\([^()]*\)[^()]*)*\)$")


def run_help(capsys, argv: list[str]) -> str:
    """``xmfl ARGV`` in this process; what it printed. It must exit with 0."""
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code in (0, None), capsys.readouterr().err
    return capsys.readouterr().out


def option_entries(help_text: str) -> list[str]:
    """Each option of a ``--help`` text, its lines joined: ``--name METAVAR  help ... (default: x)``."""
    entries: list[list[str]] = []
    current: list[str] | None = None
    for line in help_text.splitlines():
        if re.match(r"^  -", line):
            current = [line.strip()]
            entries.append(current)
        elif current is not None and re.match(r"^ {3,}\S", line):
            current.append(line.strip())
        else:
            current = None
    return [" ".join(entry) for entry in entries if not entry[0].startswith("-h, --help")]


def fails_with(capsys, argv: list[str]) -> str:
    """``xmfl ARGV`` in this process must exit with 2 and one line on stderr; that line."""
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    error = capsys.readouterr().err
    assert exited.value.code == 2, error
    assert error.count("\n") == 1 and error.startswith("error: "), error
    return error.strip()
