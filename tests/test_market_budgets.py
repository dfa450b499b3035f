"""Per-market privacy budgets: set by the run for named markets, capped by each region's node config."""

import re
import tomllib
from pathlib import Path

import pytest
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.client_app import ClientConfig, app, parse_market_epsilons
from server.server_app import ServerConfig, initial_arrays

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def server_task_identity():
    # Flower stamps messages with the sending task's identity; here the test plays the ServerApp.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def _run_config(**overrides) -> dict:
    with open(REPO / "pyproject.toml", "rb") as file:
        defaults = tomllib.load(file)["tool"]["flwr"]["app"]["config"]
    private = {"dp-epsilon": 8.0, "dp-accountant": "rdp", "num-server-rounds": 1}
    return {**defaults, "synthetic-markets": 3, "embedding-dim": 8, **private, **overrides}


def _train(run_config: dict, node_config: dict, context: Context | None = None, server_round: int = 1) -> dict:
    """One train message to the market of ``node_config``; returns its reply's metrics."""
    config = ServerConfig.from_run_config(run_config).train_config()
    config["server-round"] = server_round
    message = Message(content=RecordDict({"arrays": initial_arrays(ServerConfig.from_run_config(run_config)),
                                          "config": config}), dst_node_id=7, message_type=MessageType.TRAIN)
    context = context or _context(run_config, node_config)
    return dict(app(message, context).content["metrics"])


def _context(run_config: dict, node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=run_config)


def test_market_epsilons_parse_into_one_budget_per_named_market():
    assert parse_market_epsilons("de=4, jp=0.5") == {"de": 4.0, "jp": 0.5}
    assert parse_market_epsilons("") == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("de", "market=epsilon pairs with epsilon > 0, got 'de'"),
        ("de=four", "got 'de=four'"),
        ("de=0", "got 'de=0'"),
        ("=4", "got '=4'"),
        ("de=nan", "got 'de=nan'"),
        ("de=4,de=2", "gives market 'de' two budgets"),
    ],
)
def test_a_bad_market_epsilon_is_refused_with_the_entry(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ClientConfig.from_run_config(_run_config(**{"dp-market-epsilons": text}))


def test_market_epsilons_without_dp_for_the_others_are_refused():
    with pytest.raises(ValueError, match="dp-market-epsilons needs dp-epsilon > 0"):
        ClientConfig.from_run_config(_run_config(**{"dp-epsilon": 0.0, "dp-market-epsilons": "m01=2"}))


def test_a_named_market_spends_its_own_budget_and_the_others_the_run_budget():
    # Prepare: one round, so each market spends its whole budget in it.
    run_config = _run_config(**{"dp-market-epsilons": "m01=2"})

    # Execute
    named = _train(run_config, {"partition-id": 1, "num-partitions": 3})
    other = _train(run_config, {"partition-id": 0, "num-partitions": 3})

    # Assert
    assert 1.9 < named["epsilon"] <= 2.0
    assert 7.6 < other["epsilon"] <= 8.0


def test_a_region_caps_the_run_budget_with_its_node_config():
    run_config = _run_config()

    capped = _train(run_config, {"partition-id": 1, "num-partitions": 3, "dp-epsilon": 1})

    assert 0.95 < capped["epsilon"] <= 1.0


def test_a_regions_cap_never_raises_the_run_budget():
    run_config = _run_config(**{"dp-market-epsilons": "m01=2"})

    metrics = _train(run_config, {"partition-id": 1, "num-partitions": 3, "dp-epsilon": 5.0})

    assert 1.9 < metrics["epsilon"] <= 2.0


def test_a_region_that_demands_dp_refuses_a_run_without_it():
    run_config = _run_config(**{"dp-epsilon": 0.0})

    with pytest.raises(ValueError, match=re.escape("Market 'm01' trains only under DP with epsilon at most 1.0")):
        _train(run_config, {"partition-id": 1, "num-partitions": 3, "dp-epsilon": 1.0})


def test_a_cap_lowered_during_the_training_stops_the_market():
    # Prepare: round 1 of 2 under the run's budget alone.
    run_config = _run_config(**{"num-server-rounds": 2})
    node_config = {"partition-id": 1, "num-partitions": 3}
    context = _context(run_config, node_config)
    first = _train(run_config, node_config, context, server_round=1)

    # Execute: the region now allows no more than it already spent.
    context.node_config["dp-epsilon"] = first["epsilon"]
    second = _train(run_config, node_config, context, server_round=2)

    # Assert
    assert first["trained"] == 1 and second["trained"] == 0
    assert second["epsilon"] == pytest.approx(first["epsilon"])
    assert second["num-examples"] == 0
