"""Process handling shared by the harness and the loopback deployment: every wait has a deadline."""

import subprocess
import sys
import time

import psutil
import pytest

from common.runtime.processes import output_lines, stop_process_tree
from simulations import flower_runtime
from simulations.flower_runtime import FlowerRunError, SimulationSuperLink


def test_output_lines_stop_waiting_at_the_deadline_while_the_process_writes_nothing():
    process = subprocess.Popen(
        [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        seen = []
        started = time.monotonic()

        with pytest.raises(TimeoutError, match="still running after 2 s"):
            for line in output_lines(process, timeout=2):
                seen.append(line)

        assert seen == ["started\n"] and time.monotonic() - started < 10
    finally:
        stop_process_tree(process)


@pytest.mark.slow  # a real SuperLink (tests/README.md)
def test_a_run_that_hangs_without_output_is_stopped_at_its_timeout(tmp_path, monkeypatch):
    # Prepare: a real SuperLink, and a `flwr` that never writes a line nor exits.
    silent = tmp_path / "silent-flwr"
    silent.write_text("#!/bin/sh\nexec sleep 617.25\n")  # a duration nothing else sleeps
    silent.chmod(0o755)
    with SimulationSuperLink(1, tmp_path / "logs") as superlink:
        monkeypatch.setattr(flower_runtime, "_executable", lambda name: str(silent))
        started = time.monotonic()

        # Execute
        with pytest.raises(FlowerRunError, match="exceeded 3 s"):
            superlink.run({}, "silent", timeout=3)

    # Assert: it gave up in time and the hung process is gone.
    assert time.monotonic() - started < 30
    assert not [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", "617.25"]]


def test_the_suite_has_a_per_test_timeout(pytestconfig):
    # A hung real-process test fails with a traceback instead of blocking the suite.
    assert 0 < float(pytestconfig.getini("timeout")) <= 900
