"""Fixtures the test modules share, and the order in which the suite's files run."""

import logging
import signal

import pytest
from flwr.supercore.task_identity import TaskIdentity

from server.paths import SERVER_ROOT_ENV


@pytest.fixture(scope="session", autouse=True)
def server_root():
    """The in-process ServerApp's bound on run paths: the whole file system, as the simulation harness sets it.

    Session-wide, so that module fixtures that train see it too. A test of the bound itself sets or
    removes it with its own monkeypatch; a loopback deployment sets its own (deploy.loopback).
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SERVER_ROOT_ENV, "/")
        yield


@pytest.fixture
def server_task_identity():
    """Let the test play the ServerApp: Flower stamps messages with the sending task's identity."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


@pytest.fixture
def flower_warnings():
    """The WARNING records Flower's logger emits during the test."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


@pytest.fixture
def keep_sigterm_handler():
    """A command's ``__main__`` may turn SIGTERM into SystemExit; the test process keeps its own handler."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the files that hold slow tests first, each file's tests in their own order.

    The suite runs on two workers, a file to a worker (``--dist loadfile`` in ``pyproject.toml``), so a
    module's fixtures are built once. The slow files (real Flower processes, whole simulations) take
    minutes each; started last, one of them would run alone while the other worker idles.
    """
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # a stable sort keeps each file's order
