"""A real deployment on loopback: one TLS SuperLink with node authentication and one SuperNode per region.

The deployment tests and the round-latency benchmark run the README's deploy
commands through this class; every process it starts is stopped by PID
(with its descendants) in :meth:`LoopbackFederation.close`. Each party keeps
its keys in a folder of its own below ``root``, as on separate machines:
``release/`` the app-signing key pair (the release manager's), ``keys/<region>/``
each region's SuperNode key pair, ``server/`` the SuperLink's TLS material
and what the others handed over (the regions' public keys, the signed app).
Regions run only the app signed with the release key, served from the signed
file by an :class:`~deploy.app_index.AppIndex` in this process.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common.runtime.processes import PortTakenError, free_port, stop_process_tree, wait_for_listener
from deploy.app_index import AppIndex, load_apps
from deploy.app_keys import PRIVATE_FILE, TRUSTED_FILE, make_app_keys
from deploy.make_credentials import make_credentials
from deploy.region_keys import make_region_keys
from deploy.sign_app import sign_app
from deploy.signed_app import save_signed_app
from server.paths import SERVER_ROOT_ENV
from xmfl.app import app_dir

APP_DIR = app_dir()  # the app `flwr run` submits: the checkout, or a copy of the installed app (xmfl/app.py)
BIN = Path(sys.executable).parent
CONNECTION = "loopback"  # the named connection in the private FLWR_HOME


class LoopbackFederation:
    """SuperLink and SuperNodes as separate processes, the way regions run them.

    Parameters
    ----------
    root : Path
        Holds every party's keys, the private FLWR_HOME, the SuperLink database and every log.
    regions : dict[str, dict[str, Any]]
        Node config per region, e.g. ``{"de": {"data-path": ..., "state-dir": ...}}``;
        ``market`` is set to the region's name.
    environment : dict[str, str] or None
        Extra variables for every process, e.g. Flower's poll intervals.

    Attributes
    ----------
    app : SignedApp
        The checkout's app, signed with ``release/app-signing`` and loaded from
        ``server/app.signed``: the one app every SuperNode accepts
        (``--trusted-entities``) and :meth:`start_run` submits.
    index : AppIndex
        Hands signed apps to the SuperLink in place of Flower Hub.
    """

    def __init__(self, root: Path, regions: dict[str, dict[str, Any]], environment: dict[str, str] | None = None):
        self.root = Path(root)
        self.regions = regions
        self.release = self.root / "release"  # the release manager's machine
        self.server = self.root / "server"  # the server host's files
        self.keys = self.root / "keys"  # keys/<region>/: each region's machine
        self.home = self.root / "flwr-home"
        self.port = free_port()
        self.superlink: subprocess.Popen | None = None
        self.superlink_started = False  # once it has, the regions know its port: a restart keeps it
        self.supernodes: dict[str, subprocess.Popen] = {}
        self.others: list[subprocess.Popen] = []
        self.home.mkdir(parents=True, exist_ok=True)
        # Fresh keys for every federation (force: a benchmark may reuse its root).
        make_credentials(self.server)
        make_app_keys(self.release, force=True)
        save_signed_app(sign_app(APP_DIR, self.release / PRIVATE_FILE), self.release / "app.signed")
        for region in [*regions, "intruder"]:  # the intruder makes a key pair too, but nobody registers it
            make_region_keys(self.keys / region, region, force=True)
        # What the server host is handed: the regions' public keys and the signed app, never a private key.
        for region in regions:
            shutil.copy(self.keys / region / f"{region}.pub", self.server)
        shutil.copy(self.release / "app.signed", self.server)
        [self.app] = load_apps([self.server / "app.signed"], self.release / TRUSTED_FILE)
        self.index = AppIndex([self.app])
        self._write_connection()
        # One BLAS thread: OpenBLAS's fork handler can deadlock a process that forks while it computes.
        self.env = dict(
            os.environ,
            FLWR_HOME=str(self.home),
            PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
            OPENBLAS_NUM_THREADS="1",
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            # The SuperLink fetches `@publisher/app==version` apps, with their signatures, from here.
            FLWR_SUPERGRID_API_URL=self.index.url,
        )
        # The server host's folder that every path of a run must stay inside (server.paths); the caller's wins.
        self.env |= {SERVER_ROOT_ENV: str(root), **(environment or {})}

    def _write_connection(self) -> None:
        """The `flwr` CLI's connection to this federation's SuperLink."""
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.server / "ca.crt"}"\n'
        )

    def __enter__(self) -> "LoopbackFederation":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log(self, name: str) -> str:
        """The text a process has logged so far (``superlink``, a region, or a run)."""
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _start(self, command: list[str], log: str) -> subprocess.Popen:
        with open(self.root / f"{log}.log", "ab") as out:
            return subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )

    def start_superlink(self, attempts: int = 3) -> None:
        """Start (or restart) the SuperLink: TLS, node authentication, state in a database file.

        The first start moves to another free port, at most ``attempts`` times, when another
        process took the chosen one before the SuperLink bound it; a restart keeps its port
        (the regions know it) and fails if the port was taken.
        """
        first_start = not self.superlink_started
        for attempt in range(attempts):
            logged = len(self.log("superlink"))  # this attempt's lines start here
            self.superlink = self._start(self._superlink_command(), "superlink")
            try:
                wait_for_listener(self.superlink, self.port)
                self.superlink_started = True
                return
            except (PortTakenError, ChildProcessError) as error:
                stop_process_tree(self.superlink)
                self.superlink = None
                said = self.log("superlink")[logged:].lower()
                taken = isinstance(error, PortTakenError) or "address already in use" in said
                if not (taken and first_start) or attempt == attempts - 1:
                    raise RuntimeError(f"{error} The SuperLink's log ends:\n{self.log('superlink')[-2000:]}") from None
                self.port = free_port()
                self._write_connection()
            except TimeoutError as error:
                raise TimeoutError(f"{error} The SuperLink's log ends:\n{self.log('superlink')[-2000:]}") from None

    def _superlink_command(self) -> list[str]:
        return [
            str(BIN / "flower-superlink"),
            "--ssl-ca-certfile",
            str(self.server / "ca.crt"),
            "--ssl-certfile",
            str(self.server / "server.pem"),
            "--ssl-keyfile",
            str(self.server / "server.key"),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            # Registered node keys survive a SuperLink restart.
            "--database",
            str(self.root / "superlink.db"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]

    def kill_superlink(self) -> None:
        """Kill the SuperLink and the ServerApp it runs, as a crash would."""
        if self.superlink is not None:
            # The tree includes the SuperExec and the ServerApp, which run in sessions of their own.
            stop_process_tree(self.superlink, crash=True)
            self.superlink = None

    def register(self, region: str) -> None:
        """Register the public key the region handed the server host (``flwr supernode register``)."""
        self.flwr(["supernode", "register", str(self.server / f"{region}.pub"), CONNECTION])

    def start_supernode(self, region: str, key: str | None = None) -> subprocess.Popen:
        """Start the region's SuperNode, authenticated with its own key (or another one, to test refusal)."""
        node_config = " ".join(
            f'{name}="{value}"' for name, value in {"market": region, **self.regions[region]}.items()
        )
        process = self._start(
            [
                str(BIN / "flower-supernode"),
                "--superlink",
                f"127.0.0.1:{self.port}",
                "--root-certificates",
                str(self.server / "ca.crt"),
                "--auth-supernode-private-key",
                str(self.keys / (key or region) / (key or region)),
                # Run only apps signed with the release key; refuse anything else.
                "--trusted-entities",
                str(self.release / TRUSTED_FILE),
                "--port",
                str(free_port()),
                "--node-config",
                node_config,
            ],
            region if key is None else key,
        )
        if key is None:
            self.supernodes[region] = process
        else:
            self.others.append(process)
        return process

    def restart_supernode(self, region: str, timeout: float = 180.0, pause: float = 5.0) -> None:
        """Start the region's SuperNode again until the SuperLink lets it in, for at most ``timeout`` s.

        After a crash the SuperLink refuses the node's key until it has missed
        two heartbeats (about a minute in Flower 1.41); a supervisor such as
        systemd retries the same way, ``pause`` s after each refusal.

        Raises
        ------
        TimeoutError
            If no attempt was let in within ``timeout`` s; the last attempt is stopped.
        """
        deadline = time.monotonic() + timeout
        while True:
            activations = self.log(region).count("SuperNode ID:")
            process = self.start_supernode(region)
            while (
                process.poll() is None
                and self.log(region).count("SuperNode ID:") == activations
                and time.monotonic() < deadline
            ):
                time.sleep(0.5)
            if process.poll() is None and self.log(region).count("SuperNode ID:") > activations:
                return
            if process.poll() is None or time.monotonic() + pause >= deadline:
                break
            time.sleep(pause)  # refused: try again, as a supervisor would
        stop_process_tree(self.supernodes.pop(region))
        raise TimeoutError(
            f"The SuperLink did not let {region} back in within {timeout:.0f} s; its log ends:\n"
            f"{self.log(region)[-2000:]}"
        )

    def kill_supernode(self, region: str) -> None:
        """Kill a region's SuperNode and its ClientApp processes, as a crash would."""
        stop_process_tree(self.supernodes.pop(region), crash=True)

    def start_all(self) -> None:
        """SuperLink, registrations and one SuperNode per region."""
        self.start_superlink()
        for region in self.regions:
            self.register(region)
        for region in self.regions:
            self.start_supernode(region)

    def flwr(self, arguments: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI against this federation; a failure raises with its output."""
        finished = subprocess.run(
            [str(BIN / "flwr"), *arguments],
            env=self.env,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
        )
        if finished.returncode != 0:
            raise RuntimeError(
                f"flwr {' '.join(arguments)} failed:\n{finished.stdout[-3000:]}{finished.stderr[-3000:]}"
            )
        return finished

    def start_run(self, run_config: str, log: str = "run", app: str | None = None) -> subprocess.Popen:
        """``flwr run <app> loopback --stream`` in the background; its output goes to ``<log>.log``.

        ``app`` defaults to the signed app (``@xmarket-fl/xmarket-fl==<version>``, fetched from
        :attr:`index`); a directory submits that checkout unsigned, which the SuperNodes refuse.
        """
        process = self._start(
            [str(BIN / "flwr"), "run", app or self.app.spec, CONNECTION, "--run-config", run_config, "--stream"], log
        )
        self.others.append(process)
        return process

    def run(self, run_config: str, log: str = "run", timeout: float = 600, app: str | None = None) -> str:
        """Run the app (see :meth:`start_run`) to the end; its streamed log, or an error with the log's tail."""
        process = self.start_run(run_config, log, app)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process_tree(process)
            raise TimeoutError(f"The run did not finish in {timeout} s:\n{self.log(log)[-3000:]}") from None
        if code != 0:
            raise RuntimeError(f"The run exited with {code}:\n{self.log(log)[-3000:]}")
        return self.log(log)

    def close(self) -> None:
        """Stop every process this federation started, descendants included."""
        for process in [*self.others, *self.supernodes.values()]:
            stop_process_tree(process)
        self.others.clear()
        self.supernodes.clear()
        self.kill_superlink()
        self.index.close()
