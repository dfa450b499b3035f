"""Per-region processes for real: a TLS SuperLink with node authentication and three SuperNodes.

Every process is started here on loopback and stopped by PID afterwards.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.markets import MarketSource
from common.synthetic import SyntheticConfig, write_markets
from deploy.make_credentials import make_credentials
from simulations.flower_runtime import APP_DIR, free_port, stop_process_tree

REGIONS = ["m00", "m01", "m02"]
BIN = Path(sys.executable).parent


def _environment(home: Path) -> dict[str, str]:
    return dict(os.environ, FLWR_HOME=str(home), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
                OPENBLAS_NUM_THREADS="1")


def _wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"Nothing listens on port {port} after {timeout} s.")


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    credentials, home, data = root / "credentials", root / "home", root / "data"
    make_credentials(credentials, [*REGIONS, "intruder"], [])
    paths = write_markets(SyntheticConfig(markets=3, seed=0), data)
    MarketSource("", 3, 0).catalog().save(data / "catalog.txt")
    port = free_port()
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{credentials / "ca.crt"}"\n'
    )
    env = _environment(home)
    processes = []

    def start(command: list[str], log: str) -> subprocess.Popen:
        process = subprocess.Popen(command, stdout=open(root / log, "wb"), stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        processes.append(process)
        return process

    try:
        start([str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(credentials / "ca.crt"),
               "--ssl-certfile", str(credentials / "server.pem"), "--ssl-keyfile", str(credentials / "server.key"),
               "--enable-supernode-auth", "--disable-runtime-dependency-installation",
               "--host", "127.0.0.1", "--port", str(port)], "superlink.log")
        _wait_for_port(port)
        for region in REGIONS:
            subprocess.run([str(BIN / "flwr"), "supernode", "register", str(credentials / f"{region}.pub"), "deploy"],
                           env=env, check=True, capture_output=True, stdin=subprocess.DEVNULL)
        for region in REGIONS:
            node_config = (f'market="{region}" data-path="{paths[region]}" '
                           f'catalog-path="{data / "catalog.txt"}"')
            start([str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}",
                   "--root-certificates", str(credentials / "ca.crt"),
                   "--auth-supernode-private-key", str(credentials / region),
                   "--port", str(free_port()), "--node-config", node_config], f"{region}.log")
        yield {"root": root, "credentials": credentials, "port": port, "env": env, "data": data,
               "paths": paths, "processes": processes}
    finally:
        for process in processes:
            stop_process_tree(process)


def test_three_regions_complete_a_run_over_tls_with_authenticated_nodes(federation):
    out = federation["root"] / "out"
    run_config = (f"min-nodes=3 num-server-rounds=2 embedding-dim=8 "
                  f"catalog-path='{federation['data'] / 'catalog.txt'}' out-dir='{out}'")

    finished = subprocess.run([str(BIN / "flwr"), "run", str(APP_DIR), "deploy", "--run-config", run_config,
                               "--stream"], env=federation["env"], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=600)

    assert finished.returncode == 0, finished.stdout[-2000:]
    history = json.loads((out / "history.json").read_text())
    final = {entry["round"]: entry for entry in history["rounds"]}[2]
    assert set(final["per_market"]) == set(REGIONS)
    assert all(metrics["test-ndcg"] > 0 for metrics in final["per_market"].values())


def test_an_unregistered_node_is_refused(federation):
    credentials = federation["credentials"]
    log = federation["root"] / "intruder.log"
    intruder = subprocess.Popen(
        [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{federation['port']}",
         "--root-certificates", str(credentials / "ca.crt"),
         "--auth-supernode-private-key", str(credentials / "intruder"), "--port", str(free_port()),
         "--node-config", f'market="m00" data-path="{federation["paths"]["m00"]}"'],
        env=federation["env"], stdout=open(log, "wb"), stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while "Failed to activate SuperNode" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-2000:]
            time.sleep(0.5)
    finally:
        stop_process_tree(intruder)

    assert "Failed to activate SuperNode" in log.read_text(errors="replace")
