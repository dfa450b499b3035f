"""Fixtures the test modules share."""

import logging
import signal

import pytest
from flwr.supercore.task_identity import TaskIdentity


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
