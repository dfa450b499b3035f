"""Per-region processes for real: a TLS SuperLink with node authentication and one SuperNode per region.

Every process is started here on loopback and stopped by PID afterwards
(``LoopbackFederation.close``). Crashes are SIGKILLs of a process tree.
SuperNodes run only the app signed offline with the release manager's key;
each region made its own key pair and the server host holds only the public
halves (``tests/deploy/test_deploy_keys.py`` tests the key commands themselves).
"""

import ast
import json
import re
import time
from pathlib import Path

import pytest
import torch

from clients.models import main as models_main
from common.data.catalog import Catalog
from common.data.markets import MarketSource, load_file_split
from common.data.synthetic import SyntheticConfig, write_markets
from common.privacy.ledger import steps_per_epoch
from common.serving.query import load_served_model
from deploy.app_keys import PRIVATE_FILE, make_app_keys
from deploy.keys import holds_private_key
from deploy.loopback import APP_DIR, LoopbackFederation
from deploy.sign_app import sign_app
from simulations.run import app_defaults
from tests.run_state import checkpointed_round, rounds_in_history

REGIONS = ["m00", "m01", "m02"]
# Marked slow: every test that starts a SuperLink or a SuperNode as a real process (tests/README.md).


def _run_config(out: Path, **settings) -> str:
    """The run config of a deployed test run: fedper (heads and DP-SGD ledgers to check) unless the test
    names another method, a small model, the regions' catalog, output to ``out``."""
    catalog = out.parent / "data" / "catalog.txt"
    values = {
        "method": "'fedper'",
        "embedding-dim": 8,
        "catalog-path": f"'{catalog}'",
        "out-dir": f"'{out}'",
        **settings,
    }
    return " ".join(f"{key.replace('_', '-')}={value}" for key, value in values.items())


def _regions(root: Path, state: bool = True) -> dict[str, dict[str, str]]:
    """Three generated markets, each with its own data file and state directory, and the shared catalog."""
    data = root / "data"
    paths = write_markets(SyntheticConfig(markets=3, seed=0), data)
    MarketSource("", 3, 0).catalog().save(data / "catalog.txt")
    return {
        region: {
            "data-path": str(paths[region]),
            "catalog-path": str(data / "catalog.txt"),
            **({"state-dir": str(root / "state" / region)} if state else {}),
        }
        for region in REGIONS
    }


def _wait_for(condition, what: str, timeout: float, federation: LoopbackFederation) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"Timed out waiting for {what}:\n{federation.log('run')[-3000:]}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    regions = _regions(root)
    malformed = root / "data" / "bad.txt"
    malformed.write_text("userId itemId rating date\nu1 i1 5.0 2020-01-01\nu1 i2 lots 2020-01-02\n")
    regions["bad"] = {"data-path": str(malformed), "catalog-path": regions["m00"]["catalog-path"]}
    with LoopbackFederation(root, regions) as running:
        running.start_all()
        yield running


@pytest.mark.slow
def test_three_regions_complete_a_run_over_tls_while_a_malformed_region_reports_its_error(federation):
    # Prepare: three good regions and one whose file has a bad rating on line 3.
    out = federation.root / "out"

    # Execute
    log = federation.run(_run_config(out, min_nodes=4, num_server_rounds=2))

    # Assert: the good markets trained and evaluated every round; the bad one named its file and line.
    history = rounds_in_history(out)
    assert set(history) == {0, 1, 2}
    assert all(set(history[r]["per_market"]) == set(REGIONS) for r in history)
    assert all(m["test-ndcg"] > 0 for m in history[2]["per_market"].values())
    # The server learns the file, line and kind of problem, never the raw value; the region's own log has it.
    assert "bad.txt line 3: rating '…' is not a number" in log and "lots" not in log
    assert "bad.txt line 3: rating 'lots' is not a number" in federation.log("bad")
    saved = torch.load(federation.root / "state" / "m00" / "m00.pt", weights_only=True)
    assert saved["last-round"] == 2 and all(name.startswith("head.") for name in saved["head"])
    # When the training ended, every good region wrote its served model into its own state-dir:
    # the round its validation picked, checked against the company catalog.
    catalog = Catalog.load(federation.root / "data" / "catalog.txt")
    for region in REGIONS:
        # The training's model is served once the region's operator makes it current.
        state = federation.root / "state" / region
        assert not (state / "current").exists() and models_main(["--state-dir", str(state), "--use", "latest"]) == 0
        served = load_served_model(state / "current", catalog)
        best = max((1, 2), key=lambda r: history[r]["per_market"][region]["val-ndcg"])
        assert served.manifest["market"] == region and served.manifest["round"] == best
        assert served.manifest["training-id"] == (state / "current").resolve().name
        assert served.manifest["metrics"]["test-ndcg"] == pytest.approx(
            history[best]["per_market"][region]["test-ndcg"]
        )


@pytest.mark.slow
def test_an_unregistered_node_is_refused(federation):
    federation.start_supernode("m00", key="intruder")

    _wait_for(lambda: "Failed to activate SuperNode" in federation.log("intruder"), "the refusal", 120, federation)

    assert "Failed to activate SuperNode" in federation.log("intruder")


@pytest.mark.slow
def test_the_server_host_holds_no_private_key_but_its_tls_key(federation):
    # The regions' keys and the app-signing key were made in their own folders; the server host got public halves.
    server = federation.root / "server"
    held = sorted(path.name for path in server.iterdir() if holds_private_key(path))

    assert held == ["server.key"]
    assert {f"{region}.pub" for region in [*REGIONS, "bad"]} <= {path.name for path in server.iterdir()}
    assert (server / "app.signed").exists() and not (server / PRIVATE_FILE).exists()


@pytest.mark.slow
def test_regions_refuse_an_app_that_is_not_the_signed_one(federation, tmp_path):
    # Prepare: the same app sent from the checkout (unsigned), and signed offline by a key no region trusts
    # (a server operator's own key, say).
    forged = sign_app(APP_DIR, make_app_keys(tmp_path / "operator-keys"))
    regions = [*REGIONS, "bad"]
    before = {region: federation.log(region) for region in regions}

    # Execute: one round each with every region connected: the checkout unsigned, then the forged signature.
    federation.start_run(
        _run_config(federation.root / "out-unsigned", min_nodes=4, num_server_rounds=1),
        log="unsigned",
        app=str(APP_DIR),
    ).wait(timeout=300)
    federation.index.publish(forged)
    try:
        federation.start_run(
            _run_config(federation.root / "out-forged", min_nodes=4, num_server_rounds=1), log="forged"
        ).wait(timeout=300)
    finally:
        federation.index.publish(federation.app)

    # Assert: every region refused both runs before running any of their code, so no round completed.
    for run in ("unsigned", "forged"):
        assert "every market replied with an error or a refused reply: The FAB could not be verified." in (
            federation.log(run)
        )
        assert rounds_in_history(federation.root / f"out-{run}").keys() <= {0}
    for region in regions:
        new = federation.log(region)[len(before[region]) :]
        assert "App verification is not supported by the connected SuperLink" in new  # the unsigned app
        assert "the provided trusted entities could not verify the FAB" in new  # the forged signature
        assert "Receiving: train message" in new and "Start `flwr-clientapp`" not in new


@pytest.mark.slow
def test_a_region_killed_mid_run_leaves_the_run_going_and_rejoins_with_head_and_ledger(tmp_path):
    # Prepare: three regions training under DP-SGD, so each keeps a privacy ledger; m01 caps its budget at 2;
    # the run gives a budget to "m0O", a misspelt m00, which therefore keeps dp-epsilon. 4 rounds: m02, killed
    # in round 2, is let in again as round 2 gives up on it (both wait for the same missed heartbeats), so it
    # trains again in round 4 at the latest.
    out = tmp_path / "out"
    nodes = _regions(tmp_path)
    nodes["m01"]["dp-epsilon"] = "2.0"
    with LoopbackFederation(tmp_path, nodes) as federation:
        federation.start_all()
        run = federation.start_run(
            _run_config(
                out,
                min_nodes=2,
                num_server_rounds=4,
                dp_epsilon=8.0,
                dp_accountant="'rdp'",
                dp_market_epsilons="'m0O=4'",
                round_timeout=120.0,
            )
        )

        # Execute: kill m02 as round 2 starts; restart it until the SuperLink lets it back in.
        _wait_for(lambda: checkpointed_round(out) >= 1, "round 1", 300, federation)
        federation.kill_supernode("m02")
        federation.restart_supernode("m02")
        code = run.wait(timeout=600)

        # Assert: the run finished, naming m02 by its market when it failed; m02 rejoined with its head and
        # its ledger counting every round it trained.
        assert code == 0, federation.log("run")[-3000:]
        history = rounds_in_history(out)
        assert max(history) == 4
        assert all({"m00", "m01"} <= set(history[r]["per_market"]) for r in range(1, 5))
        assert "Market m02 rejoins training" in federation.log("m02")
        assert re.search(r"round \d: market m02 \(node \d+\) failed", federation.log("run"))
        assert any("m02" in history[r].get("failed", []) for r in range(2, 5))
        trained = [r for r in range(1, 5) if history[r]["per_market"].get("m02", {}).get("local/trained") == 1]
        saved = torch.load(tmp_path / "state" / "m02" / "m02.pt", weights_only=True)
        assert saved["last-round"] == max(trained) > 1
        regions = federation.regions["m02"]
        split = load_file_split(regions["data-path"], "m02", Catalog.load(regions["catalog-path"]), seed=0)
        saved_ledger = json.loads((tmp_path / "state" / "m02" / "m02.ledger.json").read_text())
        # DP-SGD's steps per round come from the user count the region released, not the exact one.
        released = saved_ledger["calibration"]["released-users"]
        assert abs(released - split.num_users) <= 50
        steps_per_round = steps_per_epoch(released, batch_size=app_defaults()["dp-batch-size"])
        ledger = saved_ledger["ledger"]
        assert [entry[2] for entry in ledger["history"]] == [steps_per_round * len(trained)]
        epsilons = [history[r]["per_market"]["m02"]["local/epsilon"] for r in trained]
        assert epsilons == sorted(epsilons) and epsilons[0] < epsilons[-1]
        final = history[4]["per_market"]
        assert 1.5 < final["m01"]["epsilon"] <= 2.0 < final["m00"]["epsilon"] <= 8.0
        assert "dp-market-epsilons names ['m0O'], but no such market replied" in federation.log("run")


@pytest.mark.slow
def test_restarting_a_region_gives_up_with_a_clear_error_when_it_is_never_let_in(tmp_path):
    # Prepare: no SuperLink, so the restarted SuperNode keeps trying to connect and is never let in.
    with LoopbackFederation(tmp_path, {"m00": {"data-path": str(tmp_path / "unused.txt")}}) as federation:
        started = time.monotonic()

        # Execute and assert: a timeout naming the region, well within the test's own limit, nothing left running.
        with pytest.raises(TimeoutError, match="did not let m00 back in within 2 s"):
            federation.restart_supernode("m00", timeout=2)
        assert time.monotonic() - started < 30
        assert federation.supernodes == {}


def test_deploy_does_not_import_simulations():
    # The dependency runs one way: simulations.benchmarks.latency uses deploy.loopback;
    # both use common.runtime.processes.
    imported = set()
    for path in (APP_DIR / "deploy").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported.update((path.name, alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                imported.add((path.name, node.module or ""))

    assert [(name, module) for name, module in imported if module.split(".")[0] == "simulations"] == []
