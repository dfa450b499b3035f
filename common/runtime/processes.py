"""Processes this project starts and must stop: free ports, bounded waits, whole process trees.

The simulation harness (``simulations/``) and the loopback deployment
(``deploy/``) both start Flower's processes; this module is their one home for
handling them, so neither package depends on the other. Like the rest of
``common/``, it does not import Flower.
"""

import contextlib
import queue
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import psutil


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    """Return once something listens on ``port`` on loopback; ``TimeoutError`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"Nothing listens on port {port} after {timeout} s.")


def output_lines(process: subprocess.Popen, timeout: float) -> Iterator[str]:
    """The lines ``process`` writes to its ``stdout`` pipe (text mode), until it closes it.

    Raises ``TimeoutError`` once ``timeout`` seconds have passed since the call,
    also while the process writes nothing. A thread reads the pipe, so it is
    drained even after the caller stops iterating: a process is never blocked
    on a full pipe nobody reads. Stop the process to end the thread.
    """
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        try:
            for line in process.stdout:
                lines.put(line)
        except ValueError:  # the pipe was closed under us
            pass
        finally:
            lines.put(None)

    threading.Thread(target=read, name=f"output-of-{process.pid}", daemon=True).start()
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.0))
        except queue.Empty:
            raise TimeoutError(f"Process {process.pid} was still running after {timeout:.0f} s.") from None
        if line is None:
            return
        yield line


def stop_process_tree(process: subprocess.Popen, grace: float = 10.0, crash: bool = False) -> None:
    """Stop ``process`` and every descendant: SIGTERM, then SIGKILL after ``grace`` s.

    With ``crash``, SIGKILL at once: what a power cut or an OOM kill leaves behind.

    Descendants are collected first because flower-superexec starts its own
    session, so a process-group signal would miss the simulation it runs.
    """
    try:
        root = psutil.Process(process.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    signals = (psutil.Process.kill,) if crash else (psutil.Process.terminate, psutil.Process.kill)
    for signal_all in signals:
        for member in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                signal_all(member)
        process.poll()  # reap our own child so that it can count as gone
        deadline = time.monotonic() + grace
        while not all(map(_gone, tree)) and time.monotonic() < deadline:
            time.sleep(0.05)
        tree = [member for member in tree if not _gone(member)]
        if not tree:
            break
    process.wait()


def _gone(member: psutil.Process) -> bool:
    # Orphans that exit stay zombies until init reaps them: they no longer run.
    try:
        return member.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
