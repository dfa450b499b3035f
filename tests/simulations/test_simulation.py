"""The harness end to end: real SuperLink, real simulation engine, every method."""

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from common.data.markets import MarketSource
from common.data.synthetic import SyntheticConfig, write_markets
from common.runtime.processes import output_lines, stop_process_tree
from simulations import run as harness
from tests.paths import REPO
from tests.served_check import served_test_ndcg

pytestmark = [
    pytest.mark.slow,  # a real SuperLink and the simulation engine (tests/README.md)
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


def _orphaned_by_a_stopped_superlink(process: psutil.Process) -> bool:
    # Every process the harness starts inherits its private FLWR_HOME, which it
    # deletes on stop: one still running with a deleted home was left behind.
    # (Processes of another harness running at the same time keep their home.)
    try:
        home = process.environ().get("FLWR_HOME")
        return process.status() != psutil.STATUS_ZOMBIE and home is not None and not Path(home).exists()
    except psutil.Error:
        return False


def _wait_for_lines(lines: Iterator[str], texts: list[str]) -> str:
    """Read ``lines`` (one :func:`output_lines` of a process) until each of ``texts`` was in one; what was read.

    Fails if the output ends first or its timeout passes.
    """
    seen: list[str] = []
    waiting = list(texts)
    try:
        for line in lines:
            seen.append(line)
            waiting = [text for text in waiting if text not in line]
            if not waiting:
                return "".join(seen)
    except TimeoutError:
        pytest.fail(f"No line with {waiting!r} in time; the output ends:\n{''.join(seen[-30:])}")
    pytest.fail(f"The output ended before a line with {waiting!r}:\n{''.join(seen[-30:])}")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    results = harness.main(
        [
            "--synthetic-markets",
            "3",
            "--num-server-rounds",
            "2",
            "--local-epochs",
            "1",
            "--embedding-dim",
            "16",
            "--methods",
            "local,pooled,fedavg,fedper,fedrep,fedper-ft",
            "--out",
            str(out),
        ]
    )
    orphaned = [p for p in psutil.process_iter() if _orphaned_by_a_stopped_superlink(p)]
    # Left behind means still running well after its SuperLink stopped: a Ray actor of another
    # harness that the other test worker is stopping at this moment exits within seconds.
    _, leftovers = psutil.wait_procs(orphaned, timeout=15)
    return out, results, leftovers


def test_results_have_the_documented_shape(small_run):
    out, results, _ = small_run

    written = json.loads((out / "results.json").read_text())

    assert written == json.loads(json.dumps(results))
    assert set(written["methods"]) == {"local", "pooled", "fedavg", "fedper", "fedrep", "fedper-ft", "selection"}
    sampled, full = {"ndcg@10", "hr@10"}, {"full-ndcg@10", "full-recall@10"}
    for summary in written["methods"].values():
        assert set(summary["per_market"]) == {"m00", "m01", "m02"}
        # Full-assortment metrics beside the sampled ones, for every method.
        assert set(summary["macro"]) == {*sampled, *full}
        assert set(summary["worst"]) == {*summary["macro"], "market"}
        for metric, market in summary["worst"]["market"].items():
            assert summary["worst"][metric] == min(m[metric] for m in summary["per_market"].values())
            assert summary["per_market"][market][metric] == summary["worst"][metric]
        for metrics in summary["per_market"].values():
            assert 0.0 <= metrics["ndcg@10"] <= metrics["hr@10"] <= 1.0
            # The sampled negatives are among the full ranking's candidates: full ranks are no better.
            assert 0.0 <= metrics["full-ndcg@10"] <= metrics["full-recall@10"] <= metrics["hr@10"]
            assert metrics["full-ndcg@10"] <= metrics["ndcg@10"]
            assert metrics["users"] > 0
            assert metrics["epsilon"] is None
    # fedper comes from the fedper-ft run: same training, fine-tuning only at the end.
    assert {entry["method"] for entry in written["rounds"]} == {"fedavg", "fedrep", "fedper-ft"}
    assert all(entry["seconds"] > 0 for entry in written["rounds"])
    for name in ("results.csv", "results.md", "rounds.png"):
        assert (out / name).stat().st_size > 0


def test_federated_training_improves_on_round_zero(small_run):
    out, _, _ = small_run

    history = json.loads((out / "fedper-ft" / "history.json").read_text())

    by_round = {entry["round"]: entry["per_market"] for entry in history["rounds"]}
    assert set(by_round) == {0, 1, 2}
    for market, start in by_round[0].items():
        assert by_round[2][market]["val-ndcg"] > start["val-ndcg"] + 0.05
    assert (out / "fedper-ft" / "checkpoint.pt").exists()


def test_the_harness_stops_every_process_it_started(small_run):
    _, _, leftovers = small_run

    assert leftovers == []


def test_selection_keeps_each_markets_best_model_on_validation(small_run):
    _, results, _ = small_run

    selection = results["methods"]["selection"]

    for market, chosen in selection["per_market"].items():
        candidates = {name: results["methods"][name]["per_market"][market] for name in selection["candidates"]}
        best_validation = max(entry["val-ndcg@10"] for entry in candidates.values())
        assert chosen["val-ndcg@10"] == best_validation
        assert chosen["ndcg@10"] == candidates[chosen["chosen"]]["ndcg@10"]
    assert "pooled" not in selection["candidates"]


def test_a_failing_and_an_out_of_budget_market_show_and_sigterm_stops_everything(tmp_path):
    # Prepare: a long DP run of three market files. m00's budget is too small to pay for anything,
    # so it runs out; m01's file goes bad once the harness has read it, so m01 fails every round.
    paths = write_markets(SyntheticConfig(markets=3, seed=0), tmp_path / "data")
    MarketSource(str(tmp_path / "data"), 0, 0).catalog().save(tmp_path / "catalog.txt")
    command = [
        sys.executable,
        "-m",
        "simulations.run",
        "--data-dir",
        str(tmp_path / "data"),
        "--set",
        f"catalog-path={tmp_path / 'catalog.txt'}",
        "--num-server-rounds",
        "50",
        "--methods",
        "fedavg",
        "--embedding-dim",
        "8",
        "--dp-epsilon",
        "8",
        "--dp-market-epsilons",
        "m00=0.001",
        "--out",
        str(tmp_path / "out"),
    ]
    harness_process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        stdin=subprocess.DEVNULL,
        cwd=REPO,
    )
    try:
        lines = output_lines(harness_process, timeout=420)  # one reader for the whole output
        _wait_for_lines(lines, ["3 markets (m00, m01, m02)"])
        paths["m01"].write_text("userId,itemId,rate,date\nu1,i1,lots,2020-01-01\n")

        # Execute: the harness's output names both markets within a round; then it is terminated.
        output = _wait_for_lines(lines, ["Market m00 is out of privacy budget", "failed or silent: m01"])
        started = psutil.Process(harness_process.pid).children(recursive=True)

        # Execute
        harness_process.send_signal(signal.SIGTERM)
        code = harness_process.wait(timeout=120)
    finally:
        if harness_process.poll() is None:  # the test failed before the harness ended: leave nothing behind
            stop_process_tree(harness_process)

    # Assert: the failure's cause and the budget's reached the user (WARNING and ERROR lines pass
    # through), the round line counts the markets that replied; the harness exited as terminated,
    # and took everything it had started with it.
    assert f"{paths['m01']} line 2: rating 'lots' is not a number" in output
    assert "round 0/50: macro val NDCG@10" in output and "(2 of 3 markets replied; failed or silent: m01)" in output
    assert " market m00: " not in output  # per-market lines only with --verbose
    running = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert code == 128 + signal.SIGTERM
    assert started and running == []


def test_every_method_serves_each_market_the_model_it_reports(small_run):
    # Prepare: the run's own splits, to score each market's test candidates with its served model.
    out, results, _ = small_run
    source = MarketSource("", 3, 0)
    catalog = source.catalog()

    for method in ("local", "pooled", "fedavg", "fedper", "fedrep", "fedper-ft", "selection"):
        for market, reported in results["methods"][method]["per_market"].items():
            # Execute
            served, ndcg = served_test_ndcg(out / "models" / method / market, source, market, catalog)

            # Assert: the served model is the one whose test NDCG@10 results.json reports for the market.
            assert ndcg == pytest.approx(reported["ndcg@10"], abs=1e-6), (method, market)
    # The pooled baselines kept each market's best round in a file until they wrote it: none is left.
    assert list((out / "models").rglob("*.best.pt")) == []
