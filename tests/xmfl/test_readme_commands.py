"""Every command the README shows is one its parser accepts, so the README cannot drift from the flags.

The test takes each command line of the README's ```bash blocks (backslash
continuations joined, comments skipped), leaving out the Deploy section's block
(``tests/deploy/test_readme_deploy.py`` runs that one verbatim) and the venv and pip
parts of the two quick-start lines. Quick-start command 2 must be what
``.ci/run`` runs; every other command must be ``xmfl SUB ...``: ``SUB`` must be an
``xmfl`` command, its arguments must pass that command's argument parser, in
this process, parsing only (nothing is trained, read or written), and each
option must be spelled as ``--help`` lists it (no abbreviation, no hidden old
spelling). The README stays under 300 lines.

Parsing only proves the flags exist and take those values. These README commands
are also RUN for real elsewhere in the suite, at a smaller size:

* ``xmfl simulate`` (quick start 1): the installed ``xmfl simulate`` from a wheel
  on 2 generated markets for 1 round (``test_wheel.py``); the harness on generated
  markets (``test_simulation.py``, ``test_blend.py``, ``test_fedals.py``, ...).
* ``python -m pytest`` (quick start 2): what ``.ci/run`` runs.
* ``xmfl simulate --data-dir ...``: ``python -m simulations.run --data-dir`` on
  generated market files (``test_simulation.py``).
* ``xmfl simulate ... --dp-epsilon 8 --dp-market-epsilons ...``:
  ``test_private_training.py`` and ``test_simulation.py``.
* ``xmfl simulate ... --set init-from=...``: starting from saved models through the
  same run-config key (``test_continue.py``); ``--set`` itself in
  ``test_harness_options.py``.
* ``xmfl recommend --all``, ``xmfl recommend --users ... --history ...``,
  ``xmfl score --candidates ...``: their ``main`` in ``test_serving.py``.
* ``xmfl join --model-dir ...``: its ``main`` in ``test_join.py``.
* ``xmfl privacy-sweep``: ``test_privacy_sweep.py`` (generated markets).
* ``xmfl benchmark quality``, ``join``, ``dp-step``, ``scale`` and ``latency``:
  ``test_benchmark.py``; ``xmfl benchmark continue``: ``test_continue.py``;
  ``xmfl benchmark attacks``: ``test_region_privacy.py`` (``--quick``) and
  ``test_reconstruction.py``.
* The Deploy block (``xmfl credentials``, ``xmfl catalog``, ``xmfl app-index``,
  the Flower commands): ``test_readme_deploy.py``, verbatim.

"""

import argparse
import importlib
import re
import shlex

import pytest

from tests.paths import REPO
from xmfl import cli

README = REPO / "README.md"
CI_RUN = REPO / ".ci" / "run"
MAX_LINES = 300
SETUP_PREFIXES = ("python3 -m venv ", ". .venv/bin/activate", "pip install ")


def bash_blocks(readme: str) -> list[tuple[str, str]]:
    """Each fenced ``bash`` block with the ``##`` section it is in, except the Deploy section's."""
    blocks = []
    for section in re.split(r"^(?=## )", readme, flags=re.M):
        title = section.splitlines()[0] if section else ""
        if title.startswith("## Deploy"):
            continue
        blocks += [(title, block) for block in re.findall(r"^```bash\n(.*?)^```", section, re.S | re.M)]
    return blocks


def command_lines(block: str) -> list[str]:
    """The block's commands: continuations joined, comments and blank lines left out."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def without_setup(line: str) -> str:
    """A quick-start line without its venv and pip parts: the command it runs."""
    parts = [part.strip() for part in line.split("&&")]
    return " && ".join(part for part in parts if not part.startswith(SETUP_PREFIXES))


def ci_command() -> str:
    """The command ``.ci/run`` runs: its last non-empty line."""
    return [line for line in CI_RUN.read_text(encoding="utf-8").splitlines() if line.strip()][-1].strip()


README_TEXT = README.read_text(encoding="utf-8")
LINES = [line for _, block in bash_blocks(README_TEXT) for line in command_lines(block)]
XMFL_LINES = [without_setup(line) for line in LINES if without_setup(line).startswith("xmfl ")]


def placeholders(text: str) -> str:
    """``$NAME`` and ``${NAME}`` as placeholder paths: only parsing happens, nothing is read."""
    return re.sub(r"\$\{?(\w+)\}?", lambda match: f"/placeholder/{match.group(1)}", text)


class _Parsed(Exception):
    """Raised instead of running the command once its parser has accepted the arguments."""


def parse(name: str, argv: list[str], monkeypatch) -> set[str]:
    """Parse ``argv`` as command ``name`` does: its ``parse_args``, else its ``main`` stopped after parsing.

    Returns the options ``--help`` shows of every parser that took part (a sub-command's too).
    """
    shown: set[str] = set()
    parse_known_args = argparse.ArgumentParser.parse_known_args

    def recording(self, *args, **kwargs):
        shown.update(
            option for action in self._actions if action.help != argparse.SUPPRESS for option in action.option_strings
        )
        return parse_known_args(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", recording)
    module = importlib.import_module(cli.COMMANDS[name].module)
    if hasattr(module, "parse_args"):
        module.parse_args(argv)
        return shown
    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, *args, **kwargs):
        parse_args(self, *args, **kwargs)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(_Parsed):
        module.main(argv)
    return shown


def test_the_readme_is_under_300_lines():
    count = len(README_TEXT.splitlines())

    assert count < MAX_LINES, f"README.md has {count} lines; keep it under {MAX_LINES} (move detail to docs/)"


def test_quick_start_2_is_what_ci_runs_and_every_other_command_is_xmfl():
    assert ci_command() in LINES, f"no README command is .ci/run's {ci_command()!r}"
    others = [line for line in LINES if line != ci_command() and not without_setup(line).startswith("xmfl ")]

    assert not others, f"README commands that are neither .ci/run's nor `xmfl ...`: {others}"
    assert len(XMFL_LINES) >= 10  # the extraction still finds the README's commands


@pytest.mark.parametrize("line", XMFL_LINES, ids=[" ".join(line.split()[:3]) for line in XMFL_LINES])
def test_every_xmfl_command_of_the_readme_parses(line, monkeypatch, capsys):
    name, *argv = shlex.split(placeholders(line))[1:]
    assert name in cli.COMMANDS, f"README: `{line}`: xmfl has no command {name!r}"

    try:
        shown = parse(name, argv, monkeypatch)
    except SystemExit as exited:
        pytest.fail(
            f"README: `{line}` is refused by `xmfl {name}` (exit {exited.code}): {capsys.readouterr().err.strip()}"
        )

    # argparse also accepts abbreviations and the hidden old spellings: the README spells options as --help does.
    unlisted = [token for token in argv if token.startswith("--") and token.split("=")[0] not in shown]
    assert not unlisted, f"README: `{line}`: {unlisted} are not options `xmfl {name} --help` lists"
