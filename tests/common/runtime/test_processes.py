"""Process handling shared by the harness and the loopback deployment: every wait has a deadline."""

import socket
import subprocess
import sys
import time

import psutil
import pytest

from common.runtime.processes import (
    PortTakenError,
    free_port,
    output_lines,
    stop_process_tree,
    wait_for_listener,
)
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


LISTEN = (
    "import socket, sys, time\n"
    "server = socket.socket()\n"
    "server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n"
    "server.bind(('127.0.0.1', int(sys.argv[1])))\n"
    "server.listen()\n"
    "time.sleep(600)\n"
)


def _listener_process(port: int, wrapper: bool = False) -> subprocess.Popen:
    command = [sys.executable, "-c", LISTEN, str(port)]
    if wrapper:  # the listener is a child of the started process, as Flower's SuperExec is
        command = [sys.executable, "-c", "import subprocess, sys; subprocess.run(sys.argv[1:])", *command]
    return subprocess.Popen(command, stdin=subprocess.DEVNULL)


def test_free_port_never_hands_out_the_same_port_twice():
    ports = [free_port() for _ in range(200)]

    assert len(set(ports)) == 200


@pytest.mark.parametrize("wrapper", [False, True])
def test_wait_for_listener_returns_once_the_started_process_tree_listens(wrapper):
    port = free_port()
    process = _listener_process(port, wrapper)
    try:
        started = time.monotonic()

        wait_for_listener(process, port, timeout=30)

        assert time.monotonic() - started < 30
    finally:
        stop_process_tree(process)


def test_a_port_another_process_listens_on_is_refused_even_beside_the_started_one():
    # Prepare: this test process listens first, with SO_REUSEPORT as gRPC binds, so the child can bind too.
    port = free_port()
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", port))
        other.listen()
        process = _listener_process(port)
        try:
            # Execute / Assert: a plain connect would succeed; the listener check names the intruder.
            with pytest.raises(PortTakenError, match=f"Port {port}"):
                wait_for_listener(process, port, timeout=30)
        finally:
            stop_process_tree(process)


def test_wait_for_listener_reports_a_process_that_exits_before_listening():
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"], stdin=subprocess.DEVNULL)

    with pytest.raises(ChildProcessError, match="exited with code 3"):
        wait_for_listener(process, free_port(), timeout=30)


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
