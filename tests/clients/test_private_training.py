"""DP-SGD in a market: what it reports, what it keeps, and when it stops."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict

from clients.client_app import app
from clients.messages import DP_REPORTED
from clients.privacy_state import COUNT_NOISE_MULTIPLIER, PRIVACY_KEY, RELEASED_USERS
from common.data.markets import MarketSource, load_split
from common.neural.train import MarketTensors, user_batch_inputs
from common.privacy.ledger import PrivacyLedger, sample_rate, steps_per_epoch
from common.run_config import RunConfig
from server.server_app import initial_arrays, train_config
from simulations import run as harness
from tests.in_process import run_config as in_process_config

pytestmark = [pytest.mark.usefixtures("server_task_identity"), pytest.mark.filterwarnings("ignore")]
BUDGET = 4.0


RUN = {"method": "fedper", "synthetic-markets": 3, "embedding-dim": 8, "num-server-rounds": 2, "dp-accountant": "rdp"}


def _train(run_config: dict, context: Context, server_round: int) -> Message:
    server = RunConfig.from_run_config(run_config)
    config = train_config(server)
    config["server-round"] = server_round
    message = Message(
        RecordDict({"arrays": initial_arrays(server), "config": config}), dst_node_id=7, message_type=MessageType.TRAIN
    )
    return app(message, context)


def _context(run_config: dict) -> Context:
    return Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": 2, "num-partitions": 3},
        state=RecordDict(),
        run_config=run_config,
    )


def test_a_private_round_reports_epsilon_and_differs_from_the_non_private_one():
    # Prepare
    private, public = (
        _context(in_process_config(RUN, server_loop=False, **{"dp-epsilon": BUDGET})),
        _context(in_process_config(RUN, server_loop=False, **{"dp-epsilon": 0.0})),
    )

    # Execute: the same seed, with and without DP-SGD.
    private_reply = _train(in_process_config(RUN, server_loop=False, **{"dp-epsilon": BUDGET}), private, 1)
    public_reply = _train(in_process_config(RUN, server_loop=False, **{"dp-epsilon": 0.0}), public, 1)

    # Assert
    epsilon = private_reply.content["metrics"]["epsilon"]
    assert 0 < epsilon <= BUDGET
    assert "epsilon" not in public_reply.content["metrics"]
    private_table = private_reply.content["arrays"]["encoder.item_embedding.weight"].numpy()
    public_table = public_reply.content["arrays"]["encoder.item_embedding.weight"].numpy()
    assert not np.allclose(private_table, public_table)
    assert PRIVACY_KEY in private.state


def test_dp_sgd_moves_only_the_regions_public_rows_never_the_set_its_users_bought(tmp_path):
    # Prepare: a product list of half the items the market's users bought and as many they did not.
    run_config = in_process_config(RUN, server_loop=False, **{"dp-epsilon": BUDGET})
    source = MarketSource("", 3, 0)
    catalog = source.catalog()
    bought = load_split(source, source.markets[2], catalog).market_items
    unsold = np.setdiff1d(np.arange(len(catalog.item_ids)), bought)
    listed = np.union1d(bought[::2], unsold[: len(bought[::2])])
    (tmp_path / "products.txt").write_text("\n".join(catalog.item_ids[row] for row in listed), encoding="utf-8")
    context = _context(run_config)
    context.node_config["assortment-path"] = str(tmp_path / "products.txt")
    sent = initial_arrays(RunConfig.from_run_config(run_config))["encoder.item_embedding.weight"].numpy()

    # Execute
    reply = _train(run_config, context, 1)

    # Assert: the listed rows move (with noise where no user bought), no other row does.
    returned = reply.content["arrays"]["encoder.item_embedding.weight"].numpy()
    changed = np.flatnonzero(np.any(returned != sent, axis=1))
    assert set(changed) <= set(listed.tolist())
    assert len(changed) > 0.9 * len(listed)
    assert len(set(changed) - set(bought.tolist())) > 0.9 * len(unsold[: len(bought[::2])])


def test_the_ledger_composes_over_rounds_and_the_budget_is_never_exceeded():
    run_config = in_process_config(RUN, server_loop=False, **{"dp-epsilon": BUDGET})
    context = _context(run_config)

    first = _train(run_config, context, 1).content["metrics"]["epsilon"]
    second = _train(run_config, context, 2).content["metrics"]["epsilon"]
    ledger = PrivacyLedger.from_state(json.loads(str(context.state[PRIVACY_KEY]["ledger"]))["ledger"])

    assert first < second <= BUDGET
    assert second == pytest.approx(ledger.epsilon())
    assert len(ledger.history) == 1  # one noise level for the whole run, calibrated once
    # The user count and the popularity prior, each paid once.
    assert len(ledger.releases) == 2 and ledger.releases[0] == COUNT_NOISE_MULTIPLIER


def test_a_market_out_of_budget_stops_training_and_carries_no_weight():
    run_config = in_process_config(RUN, server_loop=False, **{"dp-epsilon": BUDGET})
    context = _context(run_config)
    _train(run_config, context, 1)
    _train(run_config, context, 2)

    third = _train(run_config, context, 3)  # beyond the two rounds the budget was calibrated for

    metrics = third.content["metrics"]
    assert metrics["num-examples"] == 0
    assert metrics["epsilon"] <= BUDGET


def _evaluate(run_config: dict, context: Context, server_round: int, fine_tune_epochs: int) -> Message:
    server = RunConfig.from_run_config(run_config)
    config = train_config(server)
    config["server-round"] = server_round
    config["fine-tune-epochs"] = fine_tune_epochs
    message = Message(
        RecordDict({"arrays": initial_arrays(server), "config": config}),
        dst_node_id=7,
        message_type=MessageType.EVALUATE,
    )
    return app(message, context)


def test_fedrep_under_dp_spends_head_and_encoder_epochs_within_the_budget():
    run_config = {
        **in_process_config(RUN, server_loop=False, **{"dp-epsilon": BUDGET}),
        "method": "fedrep",
        "head-epochs": 1,
        "local-epochs": 1,
    }
    context = _context(run_config)

    first = _train(run_config, context, 1).content["metrics"]
    second = _train(run_config, context, 2).content["metrics"]
    ledger = PrivacyLedger.from_state(json.loads(str(context.state[PRIVACY_KEY]["ledger"]))["ledger"])

    # Two phases of one epoch each per round: twice the steps of one epoch, every round.
    source = MarketSource("", 3, 0)
    users = load_split(source, "m02", source.catalog()).num_users
    assert ledger.history[0][2] == 2 * 2 * steps_per_epoch(users, run_config["dp-batch-size"])
    assert first["epsilon"] < second["epsilon"] <= BUDGET
    assert second["num-examples"] > 0


def test_fedper_ft_under_dp_keeps_budget_for_the_fork_and_reports_its_epsilon():
    run_config = {
        **in_process_config(RUN, server_loop=False, **{"dp-epsilon": BUDGET}),
        "method": "fedper-ft",
        "fine-tune-epochs": 2,
    }
    context = _context(run_config)
    context.node_config["dp-exact-metrics"] = True  # the region's choice: the fork's metrics leave with it
    _train(run_config, context, 1)
    trained = _train(run_config, context, 2).content["metrics"]["epsilon"]

    final = _evaluate(run_config, context, 2, fine_tune_epochs=2).content["metrics"]

    assert trained < final["epsilon"] <= BUDGET
    assert "ft-test-ndcg" in final


def test_the_local_baseline_under_dp_spends_each_markets_budget_and_no_more(tmp_path):
    # Execute: each market alone, with the budget a federated market would get.
    # m01 has a budget of its own.
    results = harness.main(
        [
            "--synthetic-markets",
            "3",
            "--num-server-rounds",
            "2",
            "--embedding-dim",
            "8",
            "--methods",
            "local",
            "--dp-epsilon",
            str(BUDGET),
            "--dp-market-epsilons",
            "m01=1.5",
            "--out",
            str(tmp_path),
        ]
    )

    # Assert: the budget is calibrated over both rounds, so round 2 spends nearly all of it.
    per_market = results["methods"]["local"]["per_market"]
    budgets = {market: 1.5 if market == "m01" else BUDGET for market in per_market}
    assert all(0 < result["epsilon"] <= budgets[market] for market, result in per_market.items())
    assert all(
        result["epsilon"] > 0.95 * budgets[market] for market, result in per_market.items() if result["round"] == 2
    )


def test_dp_sgd_samples_at_the_released_count_never_the_exact_one():
    # Prepare: batches of 2 users, so that the rate tells the count to within 2; the region's seeded
    # noise makes the released count reproducible (it differs from the exact one: checked below).
    run_config = {**in_process_config(RUN, server_loop=False, **{"dp-epsilon": BUDGET}), "dp-batch-size": 2}
    context = _context(run_config)
    context.node_config["dp-insecure-seeded-noise"] = True

    # Execute
    reply = _train(run_config, context, 1)

    # Assert: the rate and the steps the ledger recorded are those of the released count, so the
    # epsilon the reply reports is a function of public numbers only.
    entry = json.loads(str(context.state[PRIVACY_KEY]["ledger"]))
    released = entry["calibration"][RELEASED_USERS]
    batch = int(run_config["dp-batch-size"])
    exact = load_split(MarketSource("", 3, 0), "m02", MarketSource("", 3, 0).catalog()).num_users
    assert steps_per_epoch(released, batch) != steps_per_epoch(exact, batch)
    ledger = PrivacyLedger.from_state(entry["ledger"])
    assert [(rate, steps) for _, rate, steps in ledger.history] == [
        (sample_rate(released, batch), int(run_config["local-epochs"]) * steps_per_epoch(released, batch))
    ]
    assert reply.content["metrics"]["num-examples"] == released
    assert reply.content["metrics"]["epsilon"] == pytest.approx(ledger.epsilon())


def test_dp_sgd_draws_negatives_from_the_public_rows_only():
    # Prepare: a market whose public rows are a handful of catalog rows.
    source = MarketSource("", 3, 0)
    split = load_split(source, source.markets[2], source.catalog())
    public = torch.tensor([3, 5, 7])
    data = replace(MarketTensors.from_split(split, 8), released_rows=public)

    # Execute
    (_, _, _, candidates), _ = user_batch_inputs(data, torch.arange(20), 4, 6, torch.Generator().manual_seed(0))

    # Assert: column 0 holds each user's own positive; every negative is a public row.
    assert set(candidates[..., 1:].flatten().tolist()) <= {3, 5, 7}


def test_a_fine_tune_the_budget_cannot_pay_for_is_not_trained_and_its_numbers_stay_home():
    # Prepare: a fedper-ft training calibrated for 3 rounds and a 1-epoch fork; after round 1 the
    # server asks for a 50-epoch fork, which the rounds' unspent budget could pay for in part.
    run_config = {
        **in_process_config(RUN, server_loop=False, **{"dp-epsilon": BUDGET}),
        "method": "fedper-ft",
        "fine-tune-epochs": 1,
        "num-server-rounds": 3,
    }
    context = _context(run_config)
    _train(run_config, context, 1)
    spent = json.loads(str(context.state[PRIVACY_KEY]["ledger"]))

    # Execute: the server's message asks for 50 epochs.
    reply = _evaluate(run_config, context, 1, fine_tune_epochs=50)

    # Assert: the calibrated epoch and no more was trained, within budget; nothing but DP's numbers left.
    after = PrivacyLedger.from_state(json.loads(str(context.state[PRIVACY_KEY]["ledger"]))["ledger"])
    before = PrivacyLedger.from_state(spent["ledger"])
    steps = steps_per_epoch(spent["calibration"][RELEASED_USERS], int(run_config["dp-batch-size"]))
    assert after.steps <= before.steps + steps
    assert after.epsilon() <= BUDGET
    assert set(reply.content["metrics"]) <= DP_REPORTED
