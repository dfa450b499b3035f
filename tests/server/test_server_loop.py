"""The round loop and the ServerApp against a scripted grid: what the server accepts, waits for and resumes.

The grid is real Flower API (a ``Grid`` subclass passing real ``Message``
objects); only the markets behind it are scripted functions, so that a test
can make one of them send what a broken or hostile region would.
"""

import io
import json
import logging
import tomllib
from collections.abc import Callable
from logging import ERROR
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.common.logger import FLOWER_LOGGER
from flwr.serverapp import Grid
from flwr.serverapp.strategy import strategy_utils
from opacus.accountants import RDPAccountant

from server.history import RunHistory, summary_lines
from server.resume import FINGERPRINT_KEYS
from server.rounds import AllMarketsFailedError, RoundSettings, run_rounds
from server.server_app import RunRefusedError
from server.server_app import main as server_main
from server.strategy import build_strategy
from tests.in_process import Responder, ScriptedGrid
from tests.in_process import run_config as in_process_config
from tests.paths import REPO

DROP = object()  # a metric override that removes the metric

pytestmark = pytest.mark.usefixtures("server_task_identity")


def market(
    name: str | Callable[[int], str],
    step: float = 0.1,
    weight: object = 5,
    arrays: Callable[[ArrayRecord], ArrayRecord] | None = None,
    metrics: dict | None = None,
    score: float = 0.5,
) -> Responder:
    """A market that adds ``step`` to what it received and reports ``score`` as every quality metric.

    ``name`` may depend on the server round; ``arrays`` replaces the returned
    arrays; ``metrics`` overrides train-reply metrics (``DROP`` removes one).
    """

    def respond(message: Message) -> RecordDict:
        config = message.content["config"]
        server_round = int(config["server-round"])
        quality = {"val-ndcg": score, "val-hr": score, "test-ndcg": score, "test-hr": score}
        label = ConfigRecord({"name": name(server_round) if callable(name) else name})
        if message.metadata.message_type == MessageType.EVALUATE:
            return RecordDict({"metrics": MetricRecord({"num-examples": 7, **quality}), "market": label})
        values = {"num-examples": weight, "trained": int(weight > 0) if isinstance(weight, int) else 1}
        values |= {"train-loss": 0.3, "val-ndcg": score, "val-hr": score}
        if config.get("evaluate-received", False):
            values |= {f"received-{key}": value for key, value in quality.items()}
        for key, value in (metrics or {}).items():
            values.pop(key) if value is DROP else values.__setitem__(key, value)
        sent = message.content["arrays"]
        out = arrays(sent) if arrays else ArrayRecord({k: Array(v.numpy() + np.float32(step)) for k, v in sent.items()})
        return RecordDict({"arrays": out, "metrics": MetricRecord(values), "market": label})

    return respond


START = {"encoder.w": np.zeros((2, 3), dtype=np.float32), "encoder.b": np.zeros(3, dtype=np.float32)}


def _run(tmp_path: Path, nodes: dict[int, Responder], rounds: int = 1) -> tuple[dict[str, np.ndarray], dict]:
    """``rounds`` rounds of plain FedAvg over ``nodes``; the final arrays and the written history."""
    grid = ScriptedGrid(nodes)
    settings = RoundSettings(
        num_rounds=rounds, timeout=5.0, poll_interval=0.001, fold_evaluation=True, training_id="t-1"
    )
    history = RunHistory(tmp_path, {})
    final = run_rounds(
        grid,
        build_strategy(len(nodes), None),
        history,
        settings,
        ArrayRecord({k: Array(v) for k, v in START.items()}),
        ConfigRecord({}),
        ConfigRecord(),
    )
    text = (tmp_path / "history.json").read_text()
    written = json.loads(text, parse_constant=lambda constant: pytest.fail(f"history.json holds {constant}"))
    return {k: v.numpy() for k, v in final.items()}, {entry["round"]: entry for entry in written["rounds"]}


def _refusals(records: list[logging.LogRecord]) -> list[str]:
    return [record.getMessage() for record in records if "refused the reply" in record.getMessage()]


def _moved_by(arrays: dict[str, np.ndarray], step: float) -> bool:
    return all(a.dtype == np.float32 and np.allclose(a, START[k] + step) for k, a in arrays.items())


def _replace(name: str, value: np.ndarray) -> Callable[[ArrayRecord], ArrayRecord]:
    def arrays(sent: ArrayRecord) -> ArrayRecord:
        out = {k: Array(v.numpy() + np.float32(0.1)) for k, v in sent.items()}
        out[name] = Array(value)
        return ArrayRecord(out)

    return arrays


@pytest.mark.parametrize(
    "bad_arrays",
    [
        pytest.param(_replace("encoder.b", np.array([0.0, np.nan, 0.0], dtype=np.float32)), id="nan"),
        pytest.param(_replace("encoder.w", np.full((2, 3), np.inf, dtype=np.float32)), id="inf"),
        pytest.param(_replace("encoder.b", np.zeros(3, dtype=np.float64)), id="float64"),
        pytest.param(_replace("encoder.b", np.zeros(4, dtype=np.float32)), id="shape"),
        pytest.param(_replace("head.user_embedding", np.zeros(3, dtype=np.float32)), id="extra-name"),
        pytest.param(
            lambda sent: ArrayRecord({"encoder.w": Array(np.zeros((2, 3), dtype=np.float32))}), id="missing-name"
        ),
    ],
)
def test_a_reply_with_bad_arrays_is_dropped_from_the_round_with_a_warning(tmp_path, flower_warnings, bad_arrays):
    # Prepare: de is honest; jp returns arrays the server did not send (or non-finite ones).
    nodes = {1: market("de", step=0.1, score=0.5), 2: market("jp", step=0.1, score=0.9, arrays=bad_arrays)}

    # Execute
    arrays, history = _run(tmp_path, nodes)

    # Assert: only de's update is averaged, jp's round-1 reply left no trace, and the warning names node and market.
    assert _moved_by(arrays, 0.1)
    assert "local/val-ndcg" not in history[1]["per_market"].get("jp", {})
    refusals = _refusals(flower_warnings)
    assert len(refusals) == 1 and "node 2" in refusals[0] and "'jp'" in refusals[0]


@pytest.mark.parametrize("weight", [DROP, -5, 2.5, float("nan"), float("inf"), 1e12])
def test_an_unbounded_aggregation_weight_is_refused(tmp_path, flower_warnings, weight):
    # Prepare: jp would pull the average to +10 if its weight counted.
    nodes = {1: market("de", step=0.1), 2: market("jp", step=10.0, metrics={"num-examples": weight})}

    # Execute
    arrays, _ = _run(tmp_path, nodes)

    # Assert
    assert _moved_by(arrays, 0.1)
    refusals = _refusals(flower_warnings)
    assert len(refusals) == 1 and "'num-examples'" in refusals[0] and "node 2" in refusals[0]


def test_non_finite_metrics_are_kept_out_of_the_history_with_a_warning(tmp_path, flower_warnings):
    # Prepare: jp's arrays are fine, but two of its metrics are not numbers JSON can hold.
    nodes = {1: market("de"), 2: market("jp", metrics={"val-ndcg": float("nan"), "received-test-ndcg": float("inf")})}

    # Execute: _run parses history.json strictly (no NaN, no Infinity).
    arrays, history = _run(tmp_path, nodes)

    # Assert: jp still counts in the average and keeps its finite metrics.
    assert _moved_by(arrays, 0.1)
    assert "local/val-ndcg" not in history[1]["per_market"]["jp"]
    assert history[1]["per_market"]["jp"]["local/val-hr"] == 0.5
    assert "test-ndcg" not in history[0]["per_market"]["jp"] and history[0]["per_market"]["jp"]["test-hr"] == 0.5
    messages = [record.getMessage() for record in flower_warnings if "non-finite" in record.getMessage()]
    assert any("node 2 (market jp)" in message and "'val-ndcg'=nan" in message for message in messages)


def test_a_reply_with_metrics_the_others_lack_does_not_stop_the_aggregation(tmp_path):
    # FedAvg itself raises when the replies' metric names differ.
    nodes = {1: market("de", step=0.1), 2: market("jp", step=0.3, metrics={"surprise": 1.0})}

    arrays, _ = _run(tmp_path, nodes)

    assert _moved_by(arrays, 0.2)


def test_a_node_may_not_speak_for_another_market_or_rename_itself(tmp_path, flower_warnings):
    # Prepare: in round 2 node 2 claims de's name and node 3 renames itself, both with a large update.
    nodes = {
        1: market("de", step=0.1, score=0.5),
        2: market(lambda r: "jp" if r == 1 else "de", step=0.1, score=0.9),
        3: market(lambda r: "fr" if r == 1 else "uk", step=0.1, score=0.7),
    }
    for node in (2, 3):
        honest = nodes[node]
        nodes[node] = lambda message, honest=honest: _scaled_in_round_2(honest(message), message)

    # Execute
    arrays, history = _run(tmp_path, nodes, rounds=2)

    # Assert: de's row holds node 1's numbers; neither false reply entered the history.
    assert history[2]["per_market"]["de"]["local/val-ndcg"] == 0.5
    assert "uk" not in history[2]["per_market"] and "local/val-ndcg" not in history[2]["per_market"].get("jp", {})
    refusals = _refusals(flower_warnings)
    assert any("node 2" in m and "bound to node 1" in m for m in refusals)
    assert any("node 3" in m and "'fr' before, now 'uk'" in m for m in refusals)
    assert _moved_by(arrays, 0.2)


def _scaled_in_round_2(content: RecordDict, message: Message) -> RecordDict:
    """``content`` with an update 100 times larger from round 2 on (train replies only)."""
    if int(message.content["config"]["server-round"]) < 2 or "arrays" not in content:
        return content
    sent = message.content["arrays"]
    content["arrays"] = ArrayRecord(
        {k: Array(sent[k].numpy() + 100 * (v.numpy() - sent[k].numpy())) for k, v in content["arrays"].items()}
    )
    return content


def test_a_round_in_which_every_reply_is_refused_stops_the_run(tmp_path):
    nan = _replace("encoder.b", np.full(3, np.nan, dtype=np.float32))
    nodes = {1: market("de", arrays=nan), 2: market("jp", arrays=nan)}

    with pytest.raises(AllMarketsFailedError, match="non-finite"):
        _run(tmp_path, nodes)


def test_a_market_out_of_budget_is_evaluated_but_not_averaged(tmp_path):
    # Prepare: jp is out of its privacy budget: weight 0 (and a NaN loss, as the ClientApp sends).
    nodes = {1: market("de", step=0.1), 2: market("jp", step=10.0, weight=0, metrics={"train-loss": float("nan")})}

    arrays, history = _run(tmp_path, nodes)

    assert _moved_by(arrays, 0.1)
    assert history[0]["per_market"]["jp"]["test-ndcg"] == 0.5
    assert history[1]["per_market"]["jp"]["local/num-examples"] == 0


def test_when_no_market_trained_the_arrays_stay_as_they_were(tmp_path):
    nodes = {1: market("de", step=1.0, weight=0), 2: market("jp", step=10.0, weight=0)}

    arrays, history = _run(tmp_path, nodes, rounds=2)

    assert _moved_by(arrays, 0.0)
    assert set(history[2]["per_market"]) == {"de", "jp"}


# --- the ServerApp: node timeout and resume ---------------------------------------------------------------


# With the in-process loop settings (tests/in_process.py); the output goes to {"out-dir": ...}.
RUN = {"method": "fedper", "synthetic-markets": 2, "embedding-dim": 8, "num-server-rounds": 1, "round-timeout": 5.0}


def _serve(grid: Grid, run_config: dict, run_id: int = 1) -> dict[int, dict]:
    server_main(grid, Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    history = json.loads((Path(run_config["out-dir"]) / "history.json").read_text())
    return {entry["round"]: entry for entry in history["rounds"]}


def test_waiting_for_markets_gives_up_after_node_timeout(tmp_path, monkeypatch):
    # Prepare: min-nodes 2, but one market ever connects; FedAvg's own wait polls every second (shortened here).
    monkeypatch.setattr(strategy_utils, "sleep", lambda seconds: __import__("time").sleep(0.01))
    grid = ScriptedGrid({1: market("de")})

    # Execute / Assert
    with pytest.raises(RuntimeError, match="Only 1 of the 2 nodes .* node-timeout \\(0.3 s\\)"):
        _serve(grid, in_process_config(RUN, {"out-dir": str(tmp_path)}, **{"node-timeout": 0.3}))


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("dp-epsilon", 8.0, "dp-epsilon: 0.0 -> 8.0"),
        ("user-embeddings", True, "user-embeddings: False -> True"),
        ("embedding-dim", 16, "embedding-dim: 8.0 -> 16.0"),
        ("synthetic-markets", 3, "catalog: "),
    ],
)
def test_a_resume_that_changes_a_privacy_or_shape_setting_is_refused(tmp_path, key, value, named):
    # Prepare: one completed round.
    nodes = {1: market("de"), 2: market("jp")}
    _serve(ScriptedGrid(nodes), in_process_config(RUN, {"out-dir": str(tmp_path)}))

    # Execute / Assert
    with pytest.raises(ValueError, match=f"Cannot resume from .*checkpoint.pt.*{named}"):
        _serve(
            ScriptedGrid(nodes),
            in_process_config(RUN, {"out-dir": str(tmp_path)}, resume=True, **{"num-server-rounds": 2, key: value}),
        )


def test_every_privacy_setting_of_the_app_is_fingerprinted():
    with open(REPO / "pyproject.toml", "rb") as file:
        keys = tomllib.load(file)["tool"]["flwr"]["app"]["config"]
    private = {key for key in keys if key.startswith(("dp-", "market-dp-"))}

    assert private <= set(FINGERPRINT_KEYS)


def test_a_resumed_server_keeps_each_node_bound_to_its_market(tmp_path, flower_warnings):
    # Prepare: round 1 with de on node 1 and jp on node 2.
    _serve(
        ScriptedGrid({1: market("de", score=0.5), 2: market("jp", score=0.9)}),
        in_process_config(RUN, {"out-dir": str(tmp_path)}),
    )

    # Execute: after the restart node 2 claims to be de.
    history = _serve(
        ScriptedGrid({1: market("de", score=0.5), 2: market("de", score=0.9)}),
        in_process_config(RUN, {"out-dir": str(tmp_path)}, resume=True, **{"num-server-rounds": 2}),
        run_id=2,
    )

    # Assert
    assert history[2]["per_market"]["de"]["local/val-ndcg"] == 0.5
    assert any("node 2" in m and "bound to node 1" in m for m in _refusals(flower_warnings))


def test_a_resumed_server_continues_the_market_level_dp_account(tmp_path):
    # Prepare: market-level DP over 2 markets, sigma 2; one round, then the server stops.
    noise, delta = 2.0, 1e-5
    settings = {"market-dp-noise-multiplier": noise, "market-dp-clipping-norm": 0.5, "market-dp-markets": 2}
    nodes = {1: market("de"), 2: market("jp")}
    first = _serve(ScriptedGrid(nodes), in_process_config(RUN, {"out-dir": str(tmp_path)}, **settings))

    # Execute: resume for rounds 2 and 3 in a new run.
    history = _serve(
        ScriptedGrid(nodes),
        in_process_config(RUN, {"out-dir": str(tmp_path)}, resume=True, **settings, **{"num-server-rounds": 3}),
        run_id=2,
    )

    # Assert: epsilon after round r is that of r releases (an independent accountant), not of r - 1.
    assert history[1]["market-dp-epsilon"] == first[1]["market-dp-epsilon"]
    for server_round in (1, 2, 3):
        reference = RDPAccountant()
        reference.history = [(noise, 1.0, server_round)]
        assert history[server_round]["market-dp-epsilon"] == pytest.approx(reference.get_epsilon(delta), rel=0.01)


def test_a_resumed_server_under_per_market_budgets_keeps_the_training_id(tmp_path):
    # Prepare: user-level DP with de's own budget; run 7 completes round 1.
    settings = {"dp-epsilon": 8.0, "dp-market-epsilons": "de=4", "num-server-rounds": 1}
    nodes = {1: market("de"), 2: market("jp")}
    _serve(ScriptedGrid(nodes), in_process_config(RUN, {"out-dir": str(tmp_path)}, **settings), run_id=7)

    # Execute: run 8 resumes.
    grid = ScriptedGrid(nodes)
    history = _serve(
        grid,
        in_process_config(RUN, {"out-dir": str(tmp_path)}, resume=True, **{**settings, "num-server-rounds": 3}),
        run_id=8,
    )

    # Assert: every message of the resumed run names training 7, so each market goes on with its ledger.
    assert grid.sent and {str(m.content["config"]["training-id"]) for m in grid.sent} == {"7"}
    assert {int(m.content["config"]["server-round"]) for m in grid.sent} == {2, 3}
    assert sorted(history) == [0, 1, 2, 3]


def test_a_market_that_falls_silent_is_named_in_the_log_the_history_and_the_summary(tmp_path, flower_warnings):
    # Prepare: jp replies in round 1 and is silent from round 2 on.
    jp = market("jp")
    nodes = {
        1: market("de"),
        2: lambda message: None if int(message.content["config"]["server-round"]) >= 2 else jp(message),
    }
    settings = RoundSettings(num_rounds=2, timeout=0.3, poll_interval=0.001, fold_evaluation=True, training_id="t-1")
    history = RunHistory(tmp_path, {})

    # Execute
    run_rounds(
        ScriptedGrid(nodes),
        build_strategy(2, None),
        history,
        settings,
        ArrayRecord({k: Array(v) for k, v in START.items()}),
        ConfigRecord({}),
        ConfigRecord(),
    )

    # Assert: the warning and the history name jp, and so does the summary, which finds the files.
    assert any(m.getMessage().endswith("going on without them: market jp (node 2).") for m in flower_warnings)
    assert "failed" not in history.rounds[1] and history.rounds[2]["failed"] == ["jp"]
    lines = summary_lines(history, 2)
    assert lines[0] == "Training summary: 2 of 2 rounds completed, 2 markets known"
    assert lines[1] == "  round 1: all 2 markets replied"
    assert lines[2] == "  round 2: replied: de; failed or silent: jp"
    assert lines[3].startswith("  best round by macro validation NDCG@10: ")
    assert lines[4] == "  round each market serves (its best by its own validation NDCG@10): de 1"
    assert lines[5] == f"  files: {tmp_path / 'history.json'}, {tmp_path / 'checkpoint.pt'}"


def test_a_second_training_in_the_same_out_dir_is_refused_while_resume_continues_it(tmp_path):
    # Prepare: one completed training of one round.
    nodes = {1: market("de"), 2: market("jp")}
    _serve(ScriptedGrid(nodes), in_process_config(RUN, {"out-dir": str(tmp_path)}))
    before = {name: (tmp_path / name).read_bytes() for name in ("history.json", "checkpoint.pt", "published.pt")}

    # Execute / Assert: a new training there is refused in one line naming the folder and both ways out ...
    with pytest.raises(RunRefusedError) as refused:
        _serve(
            ScriptedGrid(nodes),
            in_process_config(RUN, {"out-dir": str(tmp_path)}, **{"num-server-rounds": 2}),
            run_id=2,
        )
    assert str(refused.value) == (
        f"out-dir {tmp_path} already holds a training's history.json, checkpoint.pt, published.pt, which a new "
        "training would overwrite: give this training a new out-dir, or set resume=true to continue that training."
    )
    assert {name: (tmp_path / name).read_bytes() for name in before} == before

    # ... and resume=true continues it in the same folder.
    history = _serve(
        ScriptedGrid(nodes),
        in_process_config(RUN, {"out-dir": str(tmp_path)}, resume=True, **{"num-server-rounds": 2}),
        run_id=3,
    )
    assert sorted(history) == [0, 1, 2]


def test_the_server_ends_a_training_with_its_summary(tmp_path):
    # Prepare: the INFO lines of Flower's logger.
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logging.getLogger("flwr").addHandler(handler)

    # Execute
    try:
        _serve(
            ScriptedGrid({1: market("de", score=0.5), 2: market("jp", score=0.7)}),
            in_process_config(RUN, {"out-dir": str(tmp_path)}, **{"num-server-rounds": 2}),
        )
    finally:
        logging.getLogger("flwr").removeHandler(handler)

    # Assert: the last lines say what the training did and where its files and models are.
    lines = [record.getMessage() for record in records]
    start = lines.index("Training summary: 2 of 2 rounds completed, 2 markets known")
    assert lines[start + 1] == "  rounds 1-2: all 2 markets replied"
    assert lines[start + 2].startswith("  best round by macro validation NDCG@10: 1 (validation 0.6000, test 0.6000")
    # Each market's validation is the same every round: the first of equal rounds is served.
    assert lines[start + 3] == "  round each market serves (its best by its own validation NDCG@10): de 1, jp 1"
    assert str(tmp_path / "published.pt") in lines[start + 4]
    assert lines[start + 5] == (
        "  served models: in each region, <state-dir>/models/<training-id>/ (xmfl models --use makes it the one served)"
    )


def test_flower_logs_a_refused_run_in_one_line_and_any_other_failure_with_its_traceback():
    # Prepare: a handler on Flower's logger, which logs a ServerApp's exception as run_serverapp does.
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    FLOWER_LOGGER.addHandler(handler)

    # Execute
    try:
        for error in (RunRefusedError("out-dir /x already holds a training's files."), KeyError("a bug")):
            try:
                raise error
            except Exception as ex:
                log(ERROR, "%s raised an exception", "ServerApp", exc_info=ex)
    finally:
        FLOWER_LOGGER.removeHandler(handler)

    # Assert: the refusal is one line with its reason; the bug keeps its traceback.
    lines = stream.getvalue().splitlines()
    assert lines[0] == "The training was refused: out-dir /x already holds a training's files."
    assert lines[1] == "ServerApp raised an exception" and lines[2].startswith("Traceback")
