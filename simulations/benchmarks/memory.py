"""The memory of this process and its descendants, sampled in a thread: summed RSS and PSS, and a breakdown by process.

The scale benchmark's federated runs start the SuperLink, the simulation engine and Ray's
workers as descendants; what they take together, and which of them takes it, is what a
user sizing a machine needs. psutil lists the tree and reads RSS; PSS, which counts a page
shared by several processes once, comes from Linux's ``/proc/<pid>/smaps_rollup``, which
psutil reads only through the slower full ``smaps``.
"""

import threading
from pathlib import Path

import psutil


class TreeMemorySampler:
    """Samples the memory of this process and its descendants in a thread.

    The sum of resident sets (RSS) counts a page shared by several processes (the torch and
    Ray libraries every worker maps, Ray's object store) once per process; the sum of
    proportional sets (PSS, Linux) shares each such page among its users and so adds up to the
    memory the tree really takes. Both peaks are kept; the limit and the breakdown use PSS
    where the system provides it.

    Parameters
    ----------
    interval : float
        Seconds between samples (a sample itself takes ~0.5 s for a dozen large processes).
    limit_bytes : int, optional
        Above this sum the descendants are killed (the run then fails) and ``exceeded`` is set,
        so that a method that cannot fit stops before the machine's out-of-memory killer picks
        a process of its own.
    """

    def __init__(self, interval: float = 0.25, limit_bytes: int | None = None) -> None:
        self.interval = interval
        self.limit_bytes = limit_bytes
        self.exceeded = False
        self.peak_bytes = 0  # summed RSS
        self.peak_pss_bytes = 0  # summed PSS (RSS where PSS cannot be read)
        self.at_peak: dict[str, float] = {}  # PSS MiB per kind of process when the PSS sum peaked
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "TreeMemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            resident, proportional, by_kind = 0, 0, {}
            for process in [me, *me.children(recursive=True)]:
                try:
                    rss = process.memory_info().rss
                    pss = _pss(process.pid, rss)
                    kind = _kind(process)
                except psutil.Error:
                    continue  # exited between listing and reading
                resident += rss
                proportional += pss
                by_kind[kind] = by_kind.get(kind, 0.0) + pss / 2**20
            self.peak_bytes = max(self.peak_bytes, resident)
            if proportional > self.peak_pss_bytes:
                self.peak_pss_bytes, self.at_peak = proportional, by_kind
            if self.limit_bytes is not None and proportional > self.limit_bytes and not self.exceeded:
                self.exceeded = True
                for child in me.children(recursive=True):
                    try:
                        child.kill()
                    except psutil.Error:
                        continue
            self._stop.wait(self.interval)


def _pss(pid: int, rss: int) -> int:
    """The process's proportional set size in bytes from ``/proc/<pid>/smaps_rollup``; ``rss`` without one."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as file:
            for line in file:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss


def _kind(process: psutil.Process) -> str:
    """A process's kind for the memory breakdown: its program or Ray role, e.g. ``flwr-simulation``."""
    command = process.cmdline()
    if not command:
        return process.name()
    if command[0].startswith("ray::"):
        return command[0].split()[0]
    named = [
        Path(part).name for part in command[:3] if not part.startswith("-") and not Path(part).name.startswith("python")
    ]
    return named[0] if named else Path(command[0]).name
