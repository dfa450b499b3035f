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

_HANDED_OUT: set[int] = set()  # ports free_port gave this process: never handed out twice


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now and this process has not handed out before.

    The port is not held: another process may bind it before the caller's child does. Start the
    child, then confirm with :func:`wait_for_listener` that the listener is the child's.
    """
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


class PortTakenError(OSError):
    """Another process, not the one started for it, listens on (or binds) the port."""


def _tree(process: subprocess.Popen) -> list[psutil.Process]:
    try:
        root = psutil.Process(process.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


# Addresses whose listener shares 127.0.0.1:port with ours (the wildcard ones, and loopback itself).
_CLASHING = {"127.0.0.1", "0.0.0.0", "::", "::ffff:127.0.0.1"}


def _listeners(port: int) -> set[int | None] | None:
    """PIDs of the processes listening on loopback TCP ``port`` (``None`` for one this user may not
    see), or None where the system lets only root list every socket (macOS)."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return None
    return {
        connection.pid
        for connection in connections
        if connection.status == psutil.CONN_LISTEN
        and connection.laddr
        and connection.laddr.port == port
        and connection.laddr.ip in _CLASHING
    }


def _tree_listens(process: subprocess.Popen, port: int) -> bool:
    """Whether a process of ``process``'s tree listens on ``port`` (its own sockets: no root needed)."""
    for member in _tree(process):
        with contextlib.suppress(psutil.Error):
            for connection in member.net_connections(kind="tcp"):
                if connection.status == psutil.CONN_LISTEN and connection.laddr and connection.laddr.port == port:
                    return True
    return False


def wait_for_listener(process: subprocess.Popen, port: int, timeout: float = 30.0) -> None:
    """Return once ``process`` (or a process it started) listens on ``port`` on loopback.

    Raises
    ------
    PortTakenError
        If a process outside ``process``'s tree listens on ``port`` (instead of it, or beside it
        through ``SO_REUSEPORT``): the port was taken between :func:`free_port` and the bind.
    ChildProcessError
        If ``process`` exits first.
    TimeoutError
        If nothing listens after ``timeout`` s.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = {member.pid for member in _tree(process)}
        listeners = _listeners(port)
        if listeners is None:  # no view of other users' sockets: ours listening is all we can check
            if _tree_listens(process, port):
                return
        else:
            ours = before | {member.pid for member in _tree(process)}
            # gRPC binds with SO_REUSEPORT: a second server can share the port, so every listener must be ours.
            if listeners - ours:
                raise PortTakenError(
                    f"Port {port} on 127.0.0.1 is held by another process, not the one started for it."
                )
            if listeners:
                return
        if process.poll() is not None:
            raise ChildProcessError(
                f"The process meant to listen on port {port} exited with code {process.returncode}."
            )
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
