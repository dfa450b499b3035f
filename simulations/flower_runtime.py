"""Run the Flower app on a SuperLink in simulation mode that this process owns.

``flwr run`` against Flower's default local connection starts a detached
SuperLink and installs the app's dependencies into a fresh environment. The
harness instead starts its own ``flower-superlink --simulation`` with runtime
dependency installation disabled, on a free loopback port, with a private
``FLWR_HOME``, submits the app with ``flwr run --stream``, and stops the whole
process group when it is done, whatever happened.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import tomli_w

from common.data.split_store import SPLIT_STORE_ENV
from common.privacy.region import SIMULATION_NODE_CONFIG_ENV
from common.runtime.command import PortInUseError
from common.runtime.processes import PortTakenError, free_port, output_lines, stop_process_tree, wait_for_listener
from server.paths import SERVER_ROOT_ENV
from xmfl.app import app_dir

CONNECTION = "harness"  # name of the SuperLink connection in the private FLWR_HOME
ADDRESS_IN_USE = "address already in use"  # how the SuperLink's log says that its port is taken


class FlowerRunError(RuntimeError):
    """The SuperLink or a run on it failed; the message points at its log."""


class SimulationSuperLink:
    """A ``flower-superlink --simulation`` process and its private ``FLWR_HOME``.

    Parameters
    ----------
    num_supernodes : int
        Simulated SuperNodes, one per market.
    log_dir : Path
        Where the SuperLink's and each run's logs are written.
    cpus_per_client : int
        Ray CPUs per ClientApp; 1 lets markets train in parallel on all cores.
    node_config : dict[str, Any], optional
        Every simulated market's node config beyond its partition (its region's own settings,
        :mod:`common.privacy.region`), passed to them through the environment.
    """

    def __init__(
        self, num_supernodes: int, log_dir: Path, cpus_per_client: int = 1, node_config: dict[str, Any] | None = None
    ) -> None:
        if num_supernodes < 1:
            raise ValueError(f"A simulation needs at least one SuperNode, got {num_supernodes}.")
        self.num_supernodes = num_supernodes
        self.cpus_per_client = cpus_per_client
        self.log_dir = Path(log_dir)
        self.node_config = dict(node_config or {})
        self.port = 0
        self._home = ""
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> "SimulationSuperLink":
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        """PID of the SuperLink process (the leader of its process group)."""
        return self._process.pid if self._process else None

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ, FLWR_HOME=self._home)
        # The SuperLink starts flower-superexec and flwr-simulation by name:
        # they must come from this interpreter's environment, not another one.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        # The simulation engine forks Ray's processes while the ServerApp thread
        # may be inside a BLAS call; OpenBLAS's fork handler then deadlocks both
        # (seen here about one start in four). Single-threaded BLAS has no pool
        # to deadlock, and markets get one core each from Ray anyway.
        env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        # The simulated markets' own node config (Flower gives them only their partition).
        env[SIMULATION_NODE_CONFIG_ENV] = json.dumps(self.node_config)
        # The user's own run config on the user's own machine: its paths may be anywhere, unless the user
        # bounded them (server.paths).
        env.setdefault(SERVER_ROOT_ENV, "/")
        # Each market split once and memory-mapped by every worker (common.data.split_store),
        # inside the private home, so it goes when the SuperLink stops.
        env[SPLIT_STORE_ENV] = str(Path(self._home, "splits"))
        return env

    def start(self, timeout: float = 60.0, attempts: int = 3) -> None:
        """Start the SuperLink and wait until it listens; on another free port, at most ``attempts``
        times, when another process takes the chosen one first."""
        for attempt in range(attempts):
            try:
                self._start_once(timeout)
                return
            except PortInUseError:
                if attempt == attempts - 1:
                    raise

    def _start_once(self, timeout: float) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        if not _port_is_free(self.port):
            raise self._port_in_use()
        self._home = tempfile.mkdtemp(prefix="flwr-home-")
        connection = {"address": f"127.0.0.1:{self.port}", "insecure": True}
        config = {"superlink": {"default": CONNECTION, CONNECTION: connection}}
        Path(self._home, "config.toml").write_text(tomli_w.dumps(config), encoding="utf-8")
        log_file = open(self.log_dir / "superlink.log", "wb")  # noqa: SIM115 - owned by the child
        self._process = subprocess.Popen(
            [
                _executable("flower-superlink"),
                "--simulation",
                "--insecure",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self._environment(),
            start_new_session=True,  # its children join its group, so stop() reaches them all
        )
        log_file.close()
        try:
            wait_for_listener(self._process, self.port, timeout)
        except PortTakenError:
            self.stop()
            raise self._port_in_use() from None
        except ChildProcessError:
            code = self._process.returncode
            self.stop()
            if ADDRESS_IN_USE in (self.log_dir / "superlink.log").read_text(errors="replace").lower():
                raise self._port_in_use() from None
            raise FlowerRunError(
                f"flower-superlink exited with code {code}; see {self.log_dir / 'superlink.log'}."
            ) from None
        except TimeoutError:
            self.stop()
            raise FlowerRunError(
                f"flower-superlink did not listen on port {self.port} within {timeout:.0f} s."
            ) from None

    def _port_in_use(self) -> PortInUseError:
        return PortInUseError(
            f"Port {self.port} on 127.0.0.1, which the simulation's SuperLink was to listen on, is in use by "
            "another process; run again (it picks a free port each time) or stop that process."
        )

    def run(
        self,
        run_config: dict[str, Any],
        name: str,
        on_line: Callable[[str], None] | None = None,
        timeout: float = 3600.0,
    ) -> None:
        """Submit the app with ``run_config`` overrides and wait for the run to end.

        Parameters
        ----------
        run_config : dict[str, Any]
            Overrides of ``[tool.flwr.app.config]``.
        name : str
            Names the run's log file, ``<log_dir>/<name>.log``.
        on_line : Callable[[str], None], optional
            Called with every line the run logs, for progress output.
        timeout : float
            Seconds before the run is considered hung.
        """
        if self._process is None:
            raise FlowerRunError("The SuperLink is not running; call start() first.")
        overrides = Path(self._home, f"{name}-run-config.toml")
        overrides.write_text(tomli_w.dumps(run_config), encoding="utf-8")
        log_path = self.log_dir / f"{name}.log"
        federation = f"num_supernodes={self.num_supernodes} client_resources_num_cpus={self.cpus_per_client}"
        command = [
            _executable("flwr"),
            "run",
            str(app_dir()),
            CONNECTION,
            "--run-config",
            str(overrides),
            "--federation-config",
            federation,
            "--stream",
        ]
        with open(log_path, "w", encoding="utf-8") as log:
            process = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._environment(),
                text=True,
                start_new_session=True,
            )
            try:
                # Bounded also while the run logs nothing: a hung run is stopped, not waited on forever.
                for line in output_lines(process, timeout):
                    log.write(line)
                    if on_line is not None:
                        on_line(line.rstrip("\n"))
                code = process.wait()
            except TimeoutError:
                raise FlowerRunError(f"Run '{name}' exceeded {timeout:.0f} s; see {log_path}.") from None
            finally:
                stop_process_tree(process)
        if code != 0:
            raise FlowerRunError(f"flwr run for '{name}' exited with code {code}; see {log_path}.")

    def stop(self) -> None:
        """Stop the SuperLink and everything it started; remove the private FLWR_HOME."""
        if self._process is not None:
            stop_process_tree(self._process)
            self._process = None
        if self._home:
            shutil.rmtree(self._home, ignore_errors=True)
            self._home = ""


def _port_is_free(port: int) -> bool:
    """Whether nothing holds TCP ``port`` on loopback (a process listening there, say)."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _executable(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise FlowerRunError(f"'{name}' is not installed in this environment; install flwr[simulation].")
    return found


def exit_cleanly_on_sigterm() -> None:
    """Turn SIGTERM (``kill``, ``timeout``, a scheduler) into SystemExit.

    Python's default for SIGTERM ends the process at once, skipping the
    ``with`` blocks that stop the SuperLink and every process under it.
    """
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
