"""The privacy guarantee as a region holds it: secure noise, a lifetime ledger, what a round may send.

Each test plays the server against the real ClientApp, as an adversarial
server would: it chooses the run config, the training ids and the arrays.
"""

import opacus
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MessageType, RecordDict

from clients.client_app import app
from clients.local_model import LOCAL_STATE_KEY
from clients.messages import DP_REPORTED, RegionError
from clients.privacy_state import INSECURE_KEY, RELEASED_USERS, MarketPrivacy
from common.data.markets import MarketSource, load_split
from common.neural.train import MarketTensors
from common.privacy.dp_sgd import dp_generator, popularity_seed, private_popularity, release_noise
from common.privacy.ledger import PrivacyBudget, default_delta, sample_rate
from common.protocol import CONTINUES_KEY
from common.run_config import RunConfig
from server.server_app import initial_arrays, train_config
from tests.in_process import run_config as in_process_config
from tests.oracles import dp_accounting_epsilon

MARKET, PARTITION = "m01", 1  # 522 users in the generated source below
pytestmark = [pytest.mark.usefixtures("server_task_identity"), pytest.mark.filterwarnings("ignore::UserWarning")]


RUN = {  # the run config of a private training over the generated markets
    "method": "fedper",  # a DP-SGD method: the tests of DP-fedals name fedals
    "synthetic-markets": 3,
    "embedding-dim": 8,
    "dp-epsilon": 4.0,
    "dp-accountant": "rdp",
    "num-server-rounds": 2,
    "dp-batch-size": 64,
}


def _message(
    run_config: dict, server_round: int = 1, training_id: str = "t1", arrays=None, continues: str = ""
) -> Message:
    server = RunConfig.from_run_config(run_config)
    config = train_config(server)
    config["server-round"], config["training-id"], config[CONTINUES_KEY] = server_round, training_id, continues
    content = RecordDict({"arrays": arrays or initial_arrays(server), "config": config})
    return Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN)


def _context(run_config: dict, **node) -> Context:
    node_config = {"partition-id": PARTITION, "num-partitions": 3, **node}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=run_config)


def _train(run_config: dict, context: Context, server_round: int = 1, training_id: str = "t1") -> Message:
    return app(_message(run_config, server_round, training_id), context)


def _metrics(reply: Message) -> dict:
    return dict(reply.content["metrics"])


def _arrays(reply: Message) -> dict[str, torch.Tensor]:
    return reply.content["arrays"].to_torch_state_dict()


def _ledger(context: Context):
    return MarketPrivacy(context, MARKET).load().ledger


def _users() -> int:
    source = MarketSource("", 3, 0)
    return load_split(source, MARKET, source.catalog()).num_users


# 1. DP noise is not predictable to whoever knows the run config.


def test_two_private_rounds_with_the_same_config_send_different_arrays():
    run_config = in_process_config(RUN, server_loop=False)

    first = _train(run_config, _context(run_config))
    second = _train(run_config, _context(run_config))

    # Same seed, same market, same round: only the DP noise and sampling differ.
    first_arrays, second_arrays = _arrays(first), _arrays(second)
    assert any(not torch.equal(first_arrays[name], second_arrays[name]) for name in first_arrays)
    assert INSECURE_KEY not in first.content["metrics"]


def test_the_popularity_release_cannot_be_reproduced_from_the_config():
    # Prepare: what a server knowing the seed and the market name would compute.
    run_config = in_process_config(RUN, server_loop=False)
    context = _context(run_config)
    source = MarketSource("", 3, 0)
    catalog = source.catalog()
    data = MarketTensors.from_split(load_split(source, MARKET, catalog), run_config["history-length"])
    budget = PrivacyBudget(4.0, default_delta(data.split.num_users), accountant="rdp")
    noise = release_noise(budget, run_config["dp-popularity-share"])
    seeded = private_popularity(data, catalog.size, noise, dp_generator(popularity_seed(MARKET, 0)))

    # Execute: the market's actual release, as it sits in its head after round 1.
    _train(run_config, context)
    released = context.state[LOCAL_STATE_KEY].to_torch_state_dict()["head.item_bias.weight"][:, 0]

    # Assert: the seeded guess does not match the release on the market's items.
    items = data.market_items
    assert not torch.allclose(released[items], seeded[items], atol=1e-3)


def test_a_region_that_chose_seeded_noise_gets_a_reproducible_run_marked_insecure():
    run_config = in_process_config(RUN, server_loop=False)
    seeded = {"dp-insecure-seeded-noise": "true"}  # the region's own node config

    first = _train(run_config, _context(run_config, **seeded))
    second = _train(run_config, _context(run_config, **seeded))

    first_arrays, second_arrays = _arrays(first), _arrays(second)
    for name in first_arrays:
        assert torch.equal(first_arrays[name], second_arrays[name])
    assert first.content["metrics"][INSECURE_KEY] == 1


def test_a_run_config_asking_for_seeded_noise_gets_secure_noise():
    # The run config is whoever reaches the SuperLink: its request must not make DP-SGD's noise removable.
    run_config = in_process_config(RUN, server_loop=False, **{"dp-insecure-seeded-noise": True})

    first = _train(run_config, _context(run_config))
    second = _train(run_config, _context(run_config))

    first_arrays, second_arrays = _arrays(first), _arrays(second)
    assert any(not torch.equal(first_arrays[name], second_arrays[name]) for name in first_arrays)
    assert INSECURE_KEY not in first.content["metrics"]


# 2. The ledger records what the steps ran at.


def test_a_training_resumed_with_a_larger_batch_is_accounted_at_the_rate_it_ran():
    # Prepare: calibrated at batch 64 (rate 1/9 for about 522 users: the released count's), then
    # resumed within the same training with a batch of all users (rate 1/2 or 1 by the count released then).
    users = _users()
    calibrated = in_process_config(RUN, server_loop=False, **{"dp-epsilon": 8.0, "num-server-rounds": 3})
    context = _context(calibrated)
    _train(calibrated, context, 1)
    first_count = MarketPrivacy(context, MARKET).load().calibration[RELEASED_USERS]
    resumed = {**calibrated, "dp-batch-size": users}
    context = Context(run_id=1, node_id=7, node_config=context.node_config, state=context.state, run_config=resumed)

    # Execute
    metrics = _metrics(_train(resumed, context, 2))

    # Assert: the steps ran at rate 1/9 and then at rate 1; the reported epsilon
    # is that composition (by an independent accountant) and stays in budget.
    ledger = _ledger(context)
    second_count = MarketPrivacy(context, MARKET).load().calibration[RELEASED_USERS]
    assert {rate for _, rate, _ in ledger.history} == {sample_rate(first_count, 64), sample_rate(second_count, users)}
    expected = dp_accounting_epsilon(ledger.budget.delta, ledger.history, ledger.releases)
    assert metrics["epsilon"] == pytest.approx(expected, rel=0.02)
    assert metrics["epsilon"] <= 8.0


# 3 and 4. One lifetime ledger per region, whatever the server names or the head becomes.


def test_a_deployed_region_under_dp_refuses_to_train_without_a_state_dir(tmp_path):
    run_config = in_process_config(RUN, server_loop=False)
    catalog = tmp_path / "catalog.txt"
    source = MarketSource("", 3, 0)
    source.catalog().save(catalog)
    data = tmp_path / f"{MARKET}.csv"
    source.interactions(MARKET).rename(columns={"user": "userId", "item": "itemId"}).to_csv(data, index=False)
    context = Context(
        run_id=1,
        node_id=7,
        state=RecordDict(),
        run_config=run_config,
        node_config={"market": MARKET, "data-path": str(data), "catalog-path": str(catalog)},
    )

    with pytest.raises(RegionError, match="trains under DP but its node config has no state-dir"):
        _train(run_config, context)


def test_a_new_training_id_does_not_reset_what_the_region_spent(tmp_path):
    run_config = in_process_config(RUN, server_loop=False, **{"num-server-rounds": 1, "dp-epsilon": 8.0})
    first = _metrics(_train(run_config, _context(run_config, **{"state-dir": str(tmp_path)}), 1, "t1"))

    # Execute: a restarted SuperNode, and a server that names a new training.
    second = _metrics(_train(run_config, _context(run_config, **{"state-dir": str(tmp_path)}), 1, "t2"))

    # Assert: the second training composes with the first and stops within the budget.
    assert first["epsilon"] > 0
    assert second["epsilon"] >= first["epsilon"]
    assert second["epsilon"] <= 8.0


def test_the_node_ceiling_bounds_the_lifetime_over_many_trainings(tmp_path):
    run_config = in_process_config(RUN, server_loop=False, **{"num-server-rounds": 1, "dp-epsilon": 8.0})
    spent = []
    for training in ("t1", "t2", "t3"):
        context = _context(run_config, **{"state-dir": str(tmp_path), "dp-epsilon": "3"})
        spent.append(_metrics(_train(run_config, context, 1, training))["epsilon"])

    assert spent == sorted(spent)
    assert spent[-1] <= 3.0


def test_the_ledger_survives_a_head_that_no_longer_fits(tmp_path):
    # Prepare: round 1 with history-only users, then the same training with user embeddings (another head shape).
    run_config = in_process_config(RUN, server_loop=False, **{"num-server-rounds": 3, "dp-epsilon": 8.0})
    first = _metrics(_train(run_config, _context(run_config, **{"state-dir": str(tmp_path)}), 1))
    reshaped = {**run_config, "user-embeddings": True}

    # Execute
    second = _metrics(_train(reshaped, _context(reshaped, **{"state-dir": str(tmp_path)}), 2))

    # Assert: the spending continues from round 1 rather than from a fresh budget.
    assert second["epsilon"] > first["epsilon"]


def test_a_lost_ledger_stops_dp_training_and_says_what_is_lost(tmp_path):
    run_config = in_process_config(RUN, server_loop=False, **{"num-server-rounds": 3})
    _train(run_config, _context(run_config, **{"state-dir": str(tmp_path)}), 1)
    (tmp_path / f"{MARKET}.ledger.json").unlink()  # an operator "moves the file away"

    with pytest.raises(RegionError, match="Everything the market spent before is unknown"):
        _train(run_config, _context(run_config, **{"state-dir": str(tmp_path)}), 2)


def test_an_unreadable_ledger_stops_dp_training(tmp_path):
    run_config = in_process_config(RUN, server_loop=False, **{"num-server-rounds": 3})
    _train(run_config, _context(run_config, **{"state-dir": str(tmp_path)}), 1)
    (tmp_path / f"{MARKET}.ledger.json").write_text('{"format": 1, "market": "m01", "ledger": {')

    with pytest.raises(RegionError, match="privacy ledger cannot be read"):
        _train(run_config, _context(run_config, **{"state-dir": str(tmp_path)}), 2)


# Enforcement through the ClientApp, not beside it.


def test_a_market_out_of_budget_neither_trains_nor_sends_what_it_trained(monkeypatch):
    # Prepare: one round's budget, spent in round 1; no blending with the market's own copy.
    run_config = in_process_config(RUN, server_loop=False, **{"num-server-rounds": 1, "dp-global-weight": 1.0})
    context = _context(run_config)
    _train(run_config, context, 1)
    steps_before = _ledger(context).steps
    message = _message(run_config, 2)
    sent = message.content["arrays"].to_torch_state_dict()
    # Count DP-SGD set-ups (the real method runs): a step taken and then refused
    # by the ledger would already have trained on the data.
    started = []
    make_private = opacus.PrivacyEngine.make_private
    monkeypatch.setattr(
        opacus.PrivacyEngine, "make_private", lambda *args, **kwargs: started.append(1) or make_private(*args, **kwargs)
    )

    # Execute
    reply = app(message, context)

    # Assert: no step taken, no weight, the arrays as received, epsilon within budget.
    assert started == []
    metrics = _metrics(reply)
    assert metrics["num-examples"] == 0 and metrics["trained"] == 0
    assert set(metrics) <= DP_REPORTED  # nothing computed from its users leaves it
    assert metrics["epsilon"] <= 4.0
    assert _ledger(context).steps == steps_before
    replied = _arrays(reply)
    for name, value in sent.items():
        assert torch.equal(replied[name], value)


def test_the_head_a_market_trained_is_the_head_it_evaluates_next_round():
    # Prepare: round 1 without DP, then a head marked by hand in context.state.
    run_config = in_process_config(RUN, server_loop=False, **{"dp-epsilon": 0.0})
    context = _context(run_config)
    _train(run_config, context, 1)
    head = context.state[LOCAL_STATE_KEY].to_torch_state_dict()
    head["head.item_bias.weight"] = torch.full_like(head["head.item_bias.weight"], float("nan"))
    context.state[LOCAL_STATE_KEY] = ArrayRecord(head)

    # Execute: round 2 evaluates the received encoder with the stored head before training.
    message = _message(run_config, 2)
    message.content["config"]["evaluate-received"] = True
    metrics = _metrics(app(message, context))

    # Assert: a NaN head scores nothing, so the head came from context.state, not from a fresh seed.
    assert metrics["received-val-ndcg"] == 0.0


# 6 and 10. What a market accepts from the network.


@pytest.mark.parametrize(
    ("spoil", "problem"),
    [
        (lambda array: array.fill_(float("nan")), "NaN or infinite"),
        (lambda array: array.double(), "are not torch.float32"),
    ],
)
def test_arrays_that_are_not_finite_float32_are_refused(spoil, problem):
    run_config = in_process_config(RUN, server_loop=False, **{"dp-epsilon": 0.0})
    arrays = initial_arrays(RunConfig.from_run_config(run_config)).to_torch_state_dict()
    name = next(iter(arrays))
    arrays[name] = spoil(arrays[name].clone())

    with pytest.raises(RegionError, match=problem):
        app(_message(run_config, arrays=ArrayRecord(arrays)), _context(run_config))


def test_a_market_name_cannot_escape_the_state_dir(tmp_path):
    run_config = in_process_config(RUN, server_loop=False, **{"dp-epsilon": 0.0})
    state = tmp_path / "state"
    context = Context(
        run_id=1,
        node_id=7,
        state=RecordDict(),
        run_config=run_config,
        node_config={"market": "../../escaped", "data-path": "x.csv", "catalog-path": "c.txt", "state-dir": str(state)},
    )

    with pytest.raises(RegionError, match="is not allowed"):
        _train(run_config, context)
    assert not (tmp_path.parent / "escaped.pt").exists()


def test_an_operator_starts_a_new_budget_period_on_purpose_and_it_stays_on_record(tmp_path, capsys):
    # Prepare: a training that spent, then a lost ledger that stops DP training.
    from clients.ledger import main as ledger_command

    # δ set, and the released count seeded (the region's choice), so both periods' first rounds match.
    run_config = in_process_config(RUN, server_loop=False, **{"num-server-rounds": 3, "dp-delta": 1e-5})
    node = {"state-dir": str(tmp_path), "dp-insecure-seeded-noise": True}
    first = _metrics(_train(run_config, _context(run_config, **node), 1))
    arguments = ["--state-dir", str(tmp_path), "--market", MARKET]

    # Execute
    assert ledger_command(["new-period", *arguments]) == 0
    resumed = _metrics(_train(run_config, _context(run_config, **node), 1, "t2"))
    assert ledger_command(["show", *arguments]) == 0

    # Assert: the new period starts from nothing; the closed one is archived and listed.
    shown = capsys.readouterr().out
    assert resumed["epsilon"] == pytest.approx(first["epsilon"])  # the same first round, not composed with it
    assert f"epsilon {first['epsilon']:.4f}" in shown and "current period" in shown
    assert len(list(tmp_path.glob(f"{MARKET}.ledger.*.json"))) == 1


@pytest.mark.parametrize(("dp_epsilon", "restored"), [(0.0, True), (4.0, False)])
def test_under_dp_a_head_trained_without_dp_is_not_restored(tmp_path, dp_epsilon, restored):
    # Prepare: a head saved by a training without DP (or by clients.join, which also fits without DP).
    from clients.local_model import build_local_model
    from clients.state_store import MarketStateStore

    plain = in_process_config(RUN, server_loop=False, **{"dp-epsilon": 0.0})
    _train(plain, _context(plain, **{"state-dir": str(tmp_path)}))
    saved = MarketStateStore(tmp_path, MARKET).load().head["head.item_bias.weight"]
    run_config = in_process_config(RUN, server_loop=False, **{"dp-epsilon": dp_epsilon})

    # Execute: a restarted SuperNode builds its model for the next training, which continues the first.
    message = _message(run_config, 1, "t2", continues="t1")
    model = build_local_model(message, _context(run_config, **{"state-dir": str(tmp_path)}))[0]

    # Assert: without DP it continues from the saved head; under DP it starts a new one,
    # since a head fitted without DP would shape what the market sends.
    assert torch.equal(model.head.item_bias.weight.detach(), saved) == restored
