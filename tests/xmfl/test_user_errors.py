"""Errors a user can cause end in one line on stderr, ``error: ...``, exit status 2; --verbose adds the traceback."""

import socket
import subprocess
import sys

import psutil
import pytest

from simulations import flower_runtime
from tests.cli_check import fails_with
from tests.paths import REPO
from xmfl import cli

pytestmark = pytest.mark.usefixtures("keep_sigterm_handler")  # tests/conftest.py


def test_a_missing_data_directory(tmp_path, capsys):
    line = fails_with(capsys, ["simulate", "--data-dir", str(tmp_path / "absent"), "--out", str(tmp_path / "out")])

    assert line == f"error: market data directory {tmp_path / 'absent'} does not exist"
    assert not (tmp_path / "out").exists()


def test_an_empty_data_directory(tmp_path, capsys):
    (tmp_path / "data").mkdir()

    line = fails_with(capsys, ["simulate", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out")])

    assert line.startswith(f"error: {tmp_path / 'data'}: no market files")


def test_a_bad_interaction_file_names_the_file_and_line(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "de.csv").write_text("userId,itemId,rate\nu1,i1,5\nu2,i2,lots\n")

    line = fails_with(capsys, ["simulate", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out")])

    assert line == f"error: {tmp_path / 'data' / 'de.csv'} line 3: rating 'lots' is not a number"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["simulate", "--num-server-rounds", "two"], "argument --num-server-rounds: invalid int value: 'two'"),
        (["simulate", "--methods", "fedfoo"], "unknown methods ['fedfoo']"),
        (["simulate", "--set", "dp-batch-size=lots"], "--set dp-batch-size: expected a value of type int, got 'lots'"),
        (["simulate", "--dp-epsilon", "-1"], "dp-epsilon must be 0 (no DP) or a positive budget, got -1.0"),
        (["privacy-sweep", "--dp-epsilons", "8,-2"], "epsilons must be positive numbers or inf"),
        (["benchmark", "quality", "--num-seeds", "0"], "--num-seeds must be at least 1, got 0"),
        (["region-keys", "--region", "../x", "--out", "unused"], "region name '../x' is not allowed"),
    ],
)
def test_a_bad_flag_or_config_value(capsys, argv, expected):
    line = fails_with(capsys, argv)

    assert expected in line and line.endswith(
        f"(see xmfl {argv[0]}{' quality' if argv[0] == 'benchmark' else ''} --help)"
    )


def test_a_port_in_use(tmp_path, capsys, monkeypatch):
    # Prepare: the port the SuperLink is to listen on is taken by another listener.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setattr(flower_runtime, "free_port", lambda: port)

        line = fails_with(
            capsys,
            [
                "simulate",
                "--synthetic-markets",
                "2",
                "--methods",
                "fedavg",
                "--num-server-rounds",
                "1",
                "--embedding-dim",
                "8",
                "--out",
                str(tmp_path),
            ],
        )

    assert line.startswith(f"error: Port {port} on 127.0.0.1, which the simulation's SuperLink")


def test_too_little_free_memory_for_the_markets(tmp_path, capsys, monkeypatch):
    # Prepare: a machine with 1 MiB free.
    free = psutil.virtual_memory()._replace(available=2**20)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: free)

    line = fails_with(capsys, ["simulate", "--synthetic-markets", "2", "--methods", "local", "--out", str(tmp_path)])

    assert "GiB, but only 0.0 GiB of memory is free" in line and line.startswith("error: 2 markets over a catalog of")
    assert not any(tmp_path.iterdir())


def test_verbose_adds_the_traceback_before_the_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["simulate", "--data-dir", str(tmp_path / "absent"), "--verbose"])

    error = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2
    assert error[0] == "Traceback (most recent call last):"
    assert error[-1] == f"error: market data directory {tmp_path / 'absent'} does not exist"


def test_python_dash_m_ends_a_user_error_the_same_way(tmp_path):
    finished = subprocess.run(
        [sys.executable, "-m", "simulations.run", "--data-dir", str(tmp_path / "absent")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert finished.returncode == 2
    assert finished.stderr == f"error: market data directory {tmp_path / 'absent'} does not exist\n"
