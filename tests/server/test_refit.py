"""A refit for serving (serve-refit): fedals trained again on every interaction, served in place of its best round."""

import json
from dataclasses import replace
from uuid import uuid4

import numpy as np
import pandas as pd
import pytest
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.client_app import app
from clients.messages import RegionError
from common.data.markets import MarketSource, load_split
from common.ials.model import IALSMarket, interaction_ratings
from common.ials.private import MIN_BUYERS_KEY
from common.ials.reference import federated_ials
from common.ials.steps import score_candidates
from common.protocol import FINAL_ROUND_KEY, REFIT_KEY
from common.run_config import RunConfig
from common.serving.query import load_served_model
from server.fedals import FedALS
from server.server_app import initial_arrays
from tests.in_process import ScriptedGrid, serve
from tests.in_process import run_config as in_process_config

SOURCE = MarketSource("", 3, 0)
RUN = {
    "method": "fedals",
    "synthetic-markets": 3,
    "history-length": 10,
    "num-server-rounds": 2,
    "min-nodes": 3,
    "als-factors": 8,
    "als-regularization": 0.1,
    "als-alpha": 5.0,
    "als-nu": 0.5,
    "als-confidence": "log",  # the refit needs the test interactions' ratings too
    "als-wire": "float32",
    "serve-refit": True,
}

pytestmark = [pytest.mark.usefixtures("server_task_identity"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def _best_macro_round(history: dict) -> int:
    """By hand: the first round with the highest mean validation NDCG@10 over the markets."""
    macro = {
        entry["round"]: np.mean([metrics["val-ndcg"] for metrics in entry["per_market"].values()])
        for entry in history["rounds"]
        if entry["round"] >= 1 and entry["per_market"] and all("val-ndcg" in m for m in entry["per_market"].values())
    }
    return max(sorted(macro), key=lambda r: (macro[r], -r))


@pytest.fixture(scope="module")
def refitted(tmp_path_factory):
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # the test plays the ServerApp
    out = tmp_path_factory.mktemp("refit")
    run_config = in_process_config(RUN, **{"out-dir": str(out / "fedals"), "models-dir": str(out / "models")})
    serve(run_config, markets=3, node_config={MIN_BUYERS_KEY: 1})  # every item shared: the reference has no rule
    return out, run_config


def test_each_market_serves_federated_ials_on_every_interaction_for_the_best_validation_round(refitted):
    # Prepare: the training's best round by macro validation, and fedals' reference (one process,
    # the float32 wire) on every interaction of every market for that many rounds.
    out, run_config = refitted
    history = json.loads((out / "fedals" / "history.json").read_text())
    rounds = _best_macro_round(history)
    catalog = SOURCE.catalog()
    markets = []
    for name in SOURCE.markets:
        split = load_split(SOURCE, name, catalog)
        markets.append(IALSMarket.from_split(split, 10, interaction_ratings(split, SOURCE.interactions(name), catalog)))
    config = replace(RunConfig.from_run_config(run_config).ials_config(), iterations=rounds)
    reference = federated_ials([market.everything for market in markets], catalog.size, config)

    for number, market in enumerate(markets):
        # Execute: the served model's scores of each user's test candidates
        split = market.split
        served = load_served_model(out / "models" / "fedals" / split.market, catalog)
        users = np.asarray(split.user_ids)[split.test.users]
        pairs = pd.DataFrame(
            {
                "userId": np.repeat(users, split.test.candidates.shape[1]),
                "itemId": [catalog.item_ids[row] for row in split.test.candidates.ravel()],
            }
        )
        scores = served.score(pairs)["score"].to_numpy().reshape(split.test.candidates.shape)

        # Assert: x_u · y_i of the reference, users solved on all their interactions; the manifest says so
        expected = score_candidates(
            reference.user_factors[number], reference.item_factors, split.test.users, split.test.candidates
        )
        assert np.abs(scores - expected).max() < 1e-4, split.market
        refit = served.manifest["refit"]
        assert refit["rounds"] == served.manifest["round"] == rounds
        assert refit["validated-round"] == max(
            (e["round"] for e in history["rounds"] if "val-ndcg" in e["per_market"].get(split.market, {})),
            key=lambda r: next(e for e in history["rounds"] if e["round"] == r)["per_market"][split.market]["val-ndcg"],
        )
    done = json.loads((out / "fedals" / "refit" / "done.json").read_text())
    assert done["rounds"] == rounds and done["training-id"]


def test_the_refit_sends_no_evaluation_and_keeps_its_rounds_apart(refitted):
    # Prepare
    out, _ = refitted

    # Execute
    refit_history = json.loads((out / "fedals" / "refit" / "history.json").read_text())

    # Assert: no market reported a validation or test metric in the refit; the training's history has none of it
    reported = {key for entry in refit_history["rounds"] for metrics in entry["per_market"].values() for key in metrics}
    assert not any(key.startswith(("val-", "test-", "local/val", "local/test")) for key in reported)
    assert refit_history["config"]["refit-rounds"] >= 1


def _to_m01(run_config: dict, settings: dict, train: bool = False) -> RecordDict:
    """fedals' server's round-1 evaluate (or train) message with ``settings`` to market m01, answered by the
    real ClientApp: its reply's content."""
    catalog = SOURCE.catalog()
    config = RunConfig.from_run_config(run_config)
    strategy = FedALS(config.ials_config(), catalog.size, seeded_start=True, min_nodes=1)
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 1, "num-partitions": 3},
        state=RecordDict(),
        run_config=run_config,
    )
    grid = ScriptedGrid({7: lambda message: app(message, context).content})
    configure = strategy.configure_train if train else strategy.configure_evaluate
    record = ConfigRecord({"training-id": "t-1", REFIT_KEY: True, **settings})
    message = list(configure(1, initial_arrays(config, catalog), record, grid))[0]
    message.metadata.__dict__["_message_id"] = uuid4().hex
    return app(message, context).content


def test_under_dp_a_market_refuses_a_refit_and_keeps_its_served_model(tmp_path):
    # Prepare: a market under DP, whose noise the training's rounds spend its budget with
    run_config = in_process_config(RUN, server_loop=False, **{"dp-epsilon": 8.0, "models-dir": str(tmp_path)})

    # Execute / Assert: refused in one line naming why; nothing written over what it serves
    with pytest.raises(RegionError, match="trains under DP"):
        _to_m01(run_config, {FINAL_ROUND_KEY: True})
    assert not (tmp_path / "fedals" / "m01").exists()


def test_a_refit_round_that_asks_for_an_evaluation_is_refused(tmp_path):
    # Prepare: a hostile server's refit round with the received factors' evaluation folded in, which would
    # score validation with users solved on the validation items (and keep that round as the best)
    run_config = in_process_config(RUN, server_loop=False, **{"models-dir": str(tmp_path)})

    # Execute / Assert
    with pytest.raises(RegionError, match="evaluates nothing"):
        _to_m01(run_config, {"evaluate-received": True}, train=True)


def test_a_refit_is_evaluated_only_at_its_last_round(tmp_path):
    # Prepare
    run_config = in_process_config(RUN, server_loop=False, **{"models-dir": str(tmp_path)})

    # Execute / Assert: the market refuses, naming why, and writes nothing
    with pytest.raises(RegionError, match="evaluated only at its last round"):
        _to_m01(run_config, {})
    assert not (tmp_path / "fedals" / "m01").exists()
