"""The harness end to end: real SuperLink, real simulation engine, every method."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from common.markets import MarketSource
from common.processes import output_lines, stop_process_tree
from simulations import run as harness
from tests.served_check import served_test_ndcg

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _orphaned_by_a_stopped_superlink(process: psutil.Process) -> bool:
    # Every process the harness starts inherits its private FLWR_HOME, which it
    # deletes on stop: one still running with a deleted home was left behind.
    # (Processes of another harness running at the same time keep their home.)
    try:
        home = process.environ().get("FLWR_HOME")
        return process.status() != psutil.STATUS_ZOMBIE and home is not None and not Path(home).exists()
    except psutil.Error:
        return False


def _wait_for_line(process: subprocess.Popen, text: str, timeout: float) -> None:
    """Read ``process``'s output until a line holds ``text``; fail if it ends first or ``timeout`` s pass."""
    seen: list[str] = []
    try:
        for line in output_lines(process, timeout):
            seen.append(line)
            if text in line:
                return
    except TimeoutError:
        pytest.fail(f"No line with {text!r} within {timeout:.0f} s; the output ends:\n{''.join(seen[-30:])}")
    pytest.fail(f"The process exited with {process.wait()} before a line with {text!r}:\n{''.join(seen[-30:])}")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    results = harness.main(
        ["--synthetic-markets", "3", "--rounds", "2", "--local-epochs", "1", "--embedding-dim", "16",
         "--methods", "local,pooled,fedavg,fedper,fedrep,fedper-ft", "--out", str(out)]
    )
    leftovers = [p for p in psutil.process_iter() if _orphaned_by_a_stopped_superlink(p)]
    return out, results, leftovers


def test_results_have_the_documented_shape(small_run):
    out, results, _ = small_run

    written = json.loads((out / "results.json").read_text())

    assert written == json.loads(json.dumps(results))
    assert set(written["methods"]) == {"local", "pooled", "fedavg", "fedper", "fedrep", "fedper-ft", "selection"}
    sampled, full = {"ndcg@10", "hr@10"}, {"full-ndcg@10", "full-recall@10"}
    for name, summary in written["methods"].items():
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


def test_sigterm_stops_the_harness_and_every_process_it_started(tmp_path):
    # Prepare: a long run, interrupted once its first round has begun.
    command = [sys.executable, "-m", "simulations.run", "--synthetic-markets", "2", "--rounds", "50",
               "--methods", "fedper", "--embedding-dim", "8", "--out", str(tmp_path)]
    harness_process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       stdin=subprocess.DEVNULL, cwd=Path(__file__).resolve().parents[1])
    try:
        _wait_for_line(harness_process, "[ROUND 1/50]", timeout=300)
        started = psutil.Process(harness_process.pid).children(recursive=True)

        # Execute
        harness_process.send_signal(signal.SIGTERM)
        code = harness_process.wait(timeout=120)
    finally:
        if harness_process.poll() is None:  # the test failed before the harness ended: leave nothing behind
            stop_process_tree(harness_process)

    # Assert: it exited as terminated, and took everything it had started with it.
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
