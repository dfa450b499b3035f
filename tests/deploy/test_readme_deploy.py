"""The README's deployment, run as written: every command of its Deploy block, from fresh Flower homes.

The block's first command sets what every other command reads (``XM``, ``DATA``,
``REGIONS``, the ports, ``ROUNDS``, ``MIN_NODES``); the test sets those to its
own values (2 generated regions, 2 rounds, free ports, everything under
``tmp_path``, a fresh ``HOME`` and no ``FLWR_HOME``) and runs every other
command verbatim through bash, in order. A command that starts a server (ends in
``&``) runs in the background, and the test waits until that server (not any
other program) listens on its port, as a person would, before the next step. The
training is started in the background so that the server can be crashed after
round 1; the test then starts the SuperLink again with step 1 and continues with
the README's resume command (this replaces the killed-server test of
``tests/deploy/test_deploy.py``). That a second training refuses the finished one's
``out-dir`` is tested in ``tests/server/test_server_loop.py``. The block's parties keep
their keys apart: the test checks that the folder of the SuperLink's TLS files
(the server host's) holds no private key but the SuperLink's, and that the
app-signing key and each region's key are elsewhere. Every process is stopped by
PID with its descendants.
"""

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch

from common.data.catalog import Catalog
from common.data.synthetic import SyntheticConfig, write_markets
from common.runtime.processes import free_port, stop_process_tree
from common.serving.query import load_served_model
from deploy.keys import holds_private_key
from deploy.loopback import APP_DIR
from tests.run_state import checkpointed_round, rounds_in_history

README = APP_DIR / "README.md"
BIN = Path(sys.executable).parent
REGIONS = ["m00", "m01"]

pytestmark = pytest.mark.slow  # every Flower process of the README, for real (tests/README.md)


def deploy_block(readme: str) -> str:
    """The fenced ``bash`` block of the README's Deploy section."""
    section = readme[readme.index("\n## Deploy") :]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"^```bash\n(.*?)^```", section, re.S | re.M)
    assert len(blocks) == 1, f"The Deploy section should hold one bash block, it holds {len(blocks)}."
    return blocks[0]


def commands(block: str) -> list[str]:
    """The block's commands: runs of lines with no blank or comment line between them."""
    groups: list[list[str]] = [[]]
    for line in block.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            groups.append([])
        else:
            groups[-1].append(line)
    return ["\n".join(group) for group in groups if group]


def settings_names(command: str) -> set[str]:
    """The shell variables a settings command assigns (``NAME=value``, comments ignored)."""
    return {name for line in command.splitlines() for name in re.findall(r"(?:^|\s)([A-Z_]+)=", line.split("#")[0])}


def free_ports(count: int) -> int:
    """A port ``base`` such that ``base + 1`` to ``base + count`` are free on loopback."""
    while True:
        base = free_port() - 1
        try:
            for port in range(base + 1, base + count + 1):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue


def other_free_ports(count: int, taken: range) -> list[int]:
    """``count`` free ports on loopback, different from each other and from ``taken``."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports and port not in taken:
            ports.append(port)
    return ports


def listens(process: subprocess.Popen, port: int) -> bool:
    """Whether ``process`` or a descendant listens on TCP ``port``: not some other program that took the port."""
    try:
        root = psutil.Process(process.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    for member in tree:
        try:
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in member.net_connections("tcp")):
                return True
        except psutil.Error:
            continue
    return False


class Shell:
    """Runs README commands through bash with the test's settings, logs in ``root/logs``; stops what it started."""

    def __init__(self, root: Path, settings: dict[str, str], env: dict[str, str]) -> None:
        self.preamble = "".join(f"{name}={shlex.quote(value)}\n" for name, value in settings.items())
        self.settings, self.env, self.cwd = settings, env, root / "cwd"
        self.logs = root / "logs"
        self.logs.mkdir(parents=True)
        self.cwd.mkdir()
        self.started: list[subprocess.Popen] = []

    def run(self, command: str, timeout: float = 600) -> str:
        """Run ``command`` to its end; its output, or a failure with it."""
        finished = subprocess.run(
            ["bash", "-eu", "-c", self.preamble + command],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        output = finished.stdout + finished.stderr
        assert finished.returncode == 0, f"{command}\nexited with {finished.returncode}:\n{output[-3000:]}"
        return output

    def start(self, command: str, log: str) -> subprocess.Popen:
        """Start ``command`` in the background (bash waits for what it starts: one tree to stop)."""
        with open(self.logs / f"{log}.log", "ab") as out:
            process = subprocess.Popen(
                ["bash", "-eu", "-c", self.preamble + command + "\nwait"],
                cwd=self.cwd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.started.append(process)
        for name in re.findall(r"--port \$(\w+)\b(?!\()", command):  # the servers it starts are up
            # Its own listener, not just any: the port was only free when picked, and another program (Ray's
            # workers of a test run beside this one, say) may have taken it since; then the server exits.
            port, deadline = int(self.settings[name]), time.monotonic() + 90
            while not listens(process, port):
                assert process.poll() is None, (
                    f"{command}\nexited with {process.returncode} before listening on ${name} ({port}):\n"
                    f"{self.log(log)[-3000:]}"
                )
                assert time.monotonic() < deadline, f"{command}\nnever listened on ${name}:\n{self.log(log)[-3000:]}"
                time.sleep(0.2)
        return process

    def wait_until_serving(self, timeout: float = 90) -> None:
        """Return once the operator's ``flwr ls`` reaches the SuperLink (its port opens before it serves)."""
        deadline = time.monotonic() + timeout
        while True:
            listed = subprocess.run(
                ["bash", "-eu", "-c", self.preamble + "FLWR_HOME=$XM/operator flwr ls xmarket"],
                cwd=self.cwd,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=60,
                stdin=subprocess.DEVNULL,
            )
            if listed.returncode == 0:
                return
            assert time.monotonic() < deadline, f"The SuperLink never served:\n{listed.stdout}{listed.stderr}"
            time.sleep(1)

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def expand(self, text: str) -> str:
        """``text`` with the settings' variables expanded, as the commands see it."""
        return self.run(f'printf %s "{text}"')

    def close(self) -> None:
        for process in self.started:
            stop_process_tree(process)


def _regions_data(data: Path) -> None:
    """2 generated markets as XMarket text files ``<region>.txt`` and the company's ``products.txt``."""
    data.mkdir(parents=True)
    products = set()
    for market, path in write_markets(SyntheticConfig(markets=2, seed=0), data / "generated").items():
        frame = pd.read_csv(path, dtype=str)
        frame.to_csv(data / f"{market}.txt", sep=" ", index=False)
        products.update(frame["itemId"])
    (data / "products.txt").write_text("".join(f"{item}\n" for item in sorted(products)))


def test_the_readme_deployment_runs_as_written_and_resumes_after_a_server_crash(tmp_path):
    # Prepare: the README's commands; the test's values for the settings they read; 2 regions' data.
    settings_command, *steps = commands(deploy_block(README.read_text(encoding="utf-8")))
    nodes = free_ports(len(REGIONS))
    port, index = other_free_ports(2, taken=range(nodes + 1, nodes + len(REGIONS) + 1))
    settings = {
        "XM": str(tmp_path / "xm"),
        "DATA": str(tmp_path / "data"),
        "REGIONS": " ".join(REGIONS),
        "PORT": str(port),
        "INDEX": str(index),
        "NODES": str(nodes),
        "ROUNDS": "2",
        "MIN_NODES": str(len(REGIONS)),
    }
    assert settings_names(settings_command) == set(settings), "the README's settings changed: update this test"
    runs = [step for step in steps if "flwr run" in step]
    assert len(runs) == 2 and "resume=true" not in runs[0] and "resume=true" in runs[1]
    serving = steps[steps.index(runs[1]) + 1 :]  # what each region does once the training ended
    assert len(serving) == 1 and "xmfl models" in serving[0] and "--use latest" in serving[0]
    superlink = next(step for step in steps if "flower-superlink" in step)
    _regions_data(tmp_path / "data")
    home = tmp_path / "home"
    home.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "FLWR_HOME"}
    env |= {
        "HOME": str(home),
        "PATH": f"{BIN}{os.pathsep}{env['PATH']}",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    shell = Shell(tmp_path, settings, env)
    try:
        xm = Path(settings["XM"])
        out = Path(shell.expand(re.search(r"out-dir='([^']+)'", runs[0]).group(1)))

        # Execute: steps 0-4 in order, the training in the background until round 1 is checkpointed, a crash
        # of the SuperLink with its ServerApp, step 1 again, then the resume command.
        for number, step in enumerate(steps[: steps.index(runs[0])]):
            if re.search(r"(?<!&)&\s*$", step, re.M):
                shell.start(step, f"step-{number}")
            else:
                shell.run(step)
        training = shell.start(runs[0], "training")
        deadline = time.monotonic() + 300
        while checkpointed_round(out) < 1:
            ended = training.poll() is not None and checkpointed_round(out) < 1
            assert not ended, f"The training ended before round 1:\n{shell.log('training')[-3000:]}"
            assert time.monotonic() < deadline, f"No round was checkpointed:\n{shell.log('training')[-3000:]}"
            time.sleep(0.2)
        stop_process_tree(next(p for p in shell.started if superlink in " ".join(p.args)), crash=True)
        before, done = rounds_in_history(out), checkpointed_round(out)
        shell.start(superlink, "superlink-again")
        shell.wait_until_serving()
        resumed = shell.run(runs[1])

        # Assert: the resume continued after the last completed round, kept the earlier ones and ended with a summary.
        history = rounds_in_history(out)
        assert done == 1 and f"after round {done}" in resumed, resumed[-3000:]
        assert sorted(history) == [0, 1, 2]
        assert history[1]["seconds"] == before[1]["seconds"]
        assert "[ROUND 1/2]" not in resumed and "[ROUND 2/2]" in resumed
        assert set(history[2]["per_market"]) == set(REGIONS)
        assert "Training summary: 2 of 2 rounds completed, 2 markets known" in resumed
        assert "rounds 1-2: all 2 markets replied" in resumed
        # Every region sent item statistics in every round and serves fedals' model of the round its validation
        # picked, from its own state-dir, over the catalog xmfl wrote; the server published fedals' item side.
        assert all(history[r]["per_market"][region]["upload-bytes"] > 0 for r in (1, 2) for region in REGIONS)
        catalog = Catalog.load(xm / "catalog.txt")
        for region in REGIONS:  # nothing served until a region's operator chose the training's model
            assert not (xm / region / "state" / "current").exists()
        shell.run(serving[0])
        for region in REGIONS:
            served = load_served_model(xm / region / "state" / "current", catalog)
            best = max((1, 2), key=lambda r: history[r]["per_market"][region]["val-ndcg"])
            assert served.manifest["market"] == region and served.manifest["method"] == "fedals"
            # The app config's serve-refit: the region serves the refit, its manifest naming the validated round.
            refit = served.manifest["refit"]
            assert refit["validated-round"] == best and served.manifest["round"] == refit["rounds"] in (1, 2)
            assert served.manifest["metrics"]["test-ndcg"] == pytest.approx(
                history[best]["per_market"][region]["test-ndcg"]
            )
        assert torch.load(out / "published.pt", weights_only=True)["method"] == "fedals"
        # Who holds which key: the server host's folder (that of the SuperLink's TLS key) holds the regions' public
        # keys and the signed app, and no private key but the SuperLink's; the app index was given none.
        server_key = Path(shell.expand(re.search(r"--ssl-keyfile (\S+)", superlink).group(1)))
        held = sorted(path.name for path in server_key.parent.rglob("*") if path.is_file() and holds_private_key(path))
        assert held == [server_key.name] and {f"{r}.pub" for r in REGIONS} <= {
            p.name for p in server_key.parent.iterdir()
        }
        index = next(step for step in steps if "xmfl app-index" in step)
        given = [Path(shell.expand(path)) for path in re.findall(r"--[a-z-]+ (\$XM/\S+)", index)]
        assert given and not any(holds_private_key(path) for path in given)
        signing_key = Path(shell.expand(re.search(r"xmfl sign-app --key (\S+)", " ".join(steps)).group(1)))
        assert holds_private_key(signing_key) and signing_key.parent != server_key.parent
        # Every Flower process kept to the FLWR_HOME the README gave it: nothing in the home directory.
        assert not (home / ".flwr").exists()
        assert any((xm / "superlink").rglob("pyproject.toml")) and any((xm / REGIONS[0]).rglob("pyproject.toml"))
    finally:
        shell.close()
