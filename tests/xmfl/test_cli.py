"""The ``xmfl`` command: its help lists every command, and every command's help shows each option's default."""

import io
import re
import subprocess
import sys
import warnings
import zipfile

import pytest

from tests.cli_check import ENDS_WITH_DEFAULT, fails_with, option_entries, run_help
from xmfl import cli

pytestmark = pytest.mark.usefixtures("keep_sigterm_handler")  # tests/conftest.py


def test_xmfl_help_lists_every_command_with_a_one_line_summary(capsys):
    text = run_help(capsys, ["--help"])

    for name, command in cli.COMMANDS.items():
        line = re.search(rf"^  {re.escape(name)} +{re.escape(command.summary)}$", text, re.MULTILINE)
        assert line is not None, name
        assert len(line.group(0)) <= 80, line.group(0)


def test_xmfl_help_does_not_import_the_commands():
    # A fresh interpreter: `xmfl --help` must not pay for torch, Flower or pandas.
    code = (
        "import sys; from xmfl import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'flwr', 'pandas', 'simulations', 'clients') if m in sys.modules))"
    )
    finished = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)

    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip().splitlines()[-1] == "[]"


def test_unknown_or_missing_command_is_one_line_and_exit_2(capsys):
    for argv in (["frobnicate"], []):
        with pytest.raises(SystemExit) as exited:
            cli.main(argv)
        assert exited.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and error[0].startswith("error:") and error[0].endswith("(see xmfl --help)")


BENCHMARKS = (
    "quality",
    "scale",
    "dp-step",
    "dp-users",
    "join",
    "continue",
    "refit",
    "latency",
    "attacks",
    "serving",
    "dims",
)


def command_helps() -> list[list[str]]:
    """``[command]`` for every command, and ``[benchmark, sub]`` for each benchmark."""
    return [[name] for name in cli.COMMANDS] + [
        ["benchmark", name]
        for name in (
            "quality",
            "scale",
            "dp-step",
            "dp-users",
            "join",
            "continue",
            "refit",
            "latency",
            "attacks",
            "serving",
            "dims",
        )
    ]


@pytest.mark.parametrize("command", command_helps(), ids=" ".join)
def test_every_command_help_names_the_command_and_shows_every_options_default(capsys, command):
    text = run_help(capsys, [*command, "--help"])

    assert text.startswith(f"usage: xmfl {' '.join(command)} ")
    options = option_entries(text)
    assert options or command == ["benchmark"], text  # benchmark itself only has sub-commands
    undocumented = [entry for entry in options if not ENDS_WITH_DEFAULT.search(entry)]
    assert undocumented == []
    # A default is a value, not a pointer elsewhere.
    assert [entry for entry in options if "(default: the app's" in entry] == []


def test_benchmark_help_lists_exactly_the_benchmarks_tested_here(capsys):
    text = run_help(capsys, ["benchmark", "--help"])

    listed = re.search(r"\{([a-z,-]+)\}", text).group(1).split(",")
    assert sorted(listed) == sorted(sub for name, *rest in command_helps() for sub in rest)


def test_outside_xmfl_a_module_still_names_itself_python_dash_m(capsys):
    from clients import score

    with pytest.raises(SystemExit):
        score.parse_args(["--help"])

    assert capsys.readouterr().out.startswith("usage: python -m clients.score ")


def test_a_command_exits_with_its_modules_status(tmp_path, capsys):
    # clients.ledger returns 2 for a ledger it cannot read; xmfl passes the status on.
    (tmp_path / "m00.ledger.json").write_text("not json")

    with pytest.raises(SystemExit) as exited:
        cli.main(["ledger", "show", "--state-dir", str(tmp_path), "--market", "m00"])

    assert exited.value.code == 2
    assert capsys.readouterr().err.startswith("error:")


def test_xmfl_app_writes_an_app_flower_can_build_and_refuses_a_used_directory(tmp_path, capsys):
    from flwr.cli.build import build_fab_from_disk

    cli.main(["app", "--out", str(tmp_path / "app")])
    with warnings.catch_warnings():  # Flower 1.41's own use of a deprecated pathspec pattern class
        warnings.simplefilter("ignore", DeprecationWarning)
        fab = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(tmp_path / "app")))

    packages = {name.split("/")[0] for name in fab.namelist() if "/" in name and not name.startswith(".")}
    assert packages == {"common", "server", "clients", "simulations"}
    assert "Wrote the xmarket-fl app" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        cli.main(["app", "--out", str(tmp_path / "app")])
    assert exited.value.code == 2
    assert "is not an empty directory" in capsys.readouterr().err


def test_a_command_missing_an_extras_module_names_the_extra_in_one_line(capsys, monkeypatch):
    # Prepare: matplotlib not installed, as in a base install (a None entry fails its import).
    monkeypatch.setitem(sys.modules, "matplotlib", None)

    # Execute: a command that imports it first thing.
    error = fails_with(capsys, ["tune", "--trials", "1"])

    # Assert: the extra to install, in one line.
    assert "pip install 'xmarket-fl[simulation]'" in error and "matplotlib" in error


def test_serving_and_joining_commands_take_verbose(capsys):
    # Execute and Assert: --verbose is an option of each (its help names it).
    for command in ("recommend", "score", "join"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        assert "--verbose" in capsys.readouterr().out
