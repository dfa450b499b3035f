"""What leaves a market: the ClientApp's replies, inspected message by message."""

import re

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from clients.client_app import app
from clients.local_model import LOCAL_STATE_KEY, OWN_ARRAYS_KEY, blend_with_own, config_from_context
from clients.messages import RegionError
from clients.privacy_state import COUNT_NOISE_MULTIPLIER, RELEASED_USERS, MarketPrivacy
from common.data.catalog import Catalog
from common.data.markets import MarketSource
from common.data.synthetic import SyntheticConfig, write_markets
from common.protocol import CONTINUES_KEY, TRAINING_ID_KEY
from common.run_config import RunConfig, parse_market_epsilons
from server.server_app import final_evaluate_config, initial_arrays, train_config
from server.server_app import main as server_main
from tests.in_process import run_config as in_process_config

pytestmark = pytest.mark.usefixtures("server_task_identity")


RUN = {"method": "fedper", "synthetic-markets": 3, "embedding-dim": 8, "local-epochs": 1}


def _train_message(run_config: dict, server_round: int = 1) -> Message:
    server = RunConfig.from_run_config(run_config)
    config = train_config(server)
    config["server-round"] = server_round
    content = RecordDict({"arrays": initial_arrays(server), "config": config})
    return Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN)


def _context(run_config: dict, node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=run_config)


def _user_ids(market: str) -> set[str]:
    return set(MarketSource("", 3, 0).interactions(market)["user"])


def _strings_in(reply: Message) -> list[str]:
    strings = []
    for record in reply.content.config_records.values():
        for value in record.values():
            strings.extend(value if isinstance(value, list) else [value])
    return [value for value in strings if isinstance(value, str)]


@pytest.mark.parametrize(
    ("method", "user_embeddings", "kept_local"),
    [("fedper", False, "head.item_bias.weight"), ("fedavg", True, "head.user_embedding.weight")],
)
def test_a_train_reply_holds_shared_arrays_and_numbers_only(method, user_embeddings, kept_local):
    # Prepare
    run_config = in_process_config(RUN, server_loop=False, method=method, **{"user-embeddings": user_embeddings})
    context = _context(run_config, {"partition-id": 1, "num-partitions": 3})

    # Execute
    reply = app(_train_message(run_config), context)

    # Assert: one ArrayRecord of shareable arrays, numbers, and the market's name.
    content = reply.content
    assert list(content.array_records) == ["arrays"]
    names = list(content["arrays"])
    if method == "fedper":
        assert names and all(name.startswith("encoder.") for name in names)
    assert not any(name.startswith("head.user_embedding") for name in names)
    metrics = content["metrics"]
    assert set(metrics) == {"num-examples", "trained", "train-loss", "train-seconds", "val-ndcg", "val-hr"}
    assert all(isinstance(value, (int, float)) for value in metrics.values())
    assert _strings_in(reply) == ["m01"]
    assert not set(_strings_in(reply)) & _user_ids("m01")
    # The head stayed behind, in the market's own state.
    assert kept_local not in names
    assert kept_local in context.state[LOCAL_STATE_KEY]


def test_under_dp_a_train_reply_weights_the_market_by_its_users_not_its_interactions():
    # Prepare: every market receives the average, so its weights must not be private counts.
    run_config = in_process_config(RUN, server_loop=False, **{"dp-epsilon": 8.0, "dp-accountant": "rdp"})
    context = _context(run_config, {"partition-id": 1, "num-partitions": 3})
    interactions = MarketSource("", 3, 0).interactions("m01")

    # Execute
    reply = app(_train_message(run_config), context)

    # Assert
    metrics = reply.content["metrics"]
    assert metrics["trained"] == 1 and 0 < metrics["epsilon"] <= 8.0
    # The user count as the ledger released it (Gaussian noise of std 10), never the count itself.
    released = MarketPrivacy(context, "m01").load().calibration[RELEASED_USERS]
    assert metrics["num-examples"] == released
    assert abs(released - interactions["user"].nunique()) <= 5 * COUNT_NOISE_MULTIPLIER
    assert metrics["num-examples"] < len(interactions)


def test_an_evaluate_reply_holds_numbers_only():
    run_config = in_process_config(RUN, server_loop=False)
    context = _context(run_config, {"partition-id": 0, "num-partitions": 3})
    message = _train_message(run_config)
    evaluate = Message(
        content=RecordDict({"arrays": message.content["arrays"], "config": ConfigRecord()}),
        dst_node_id=7,
        message_type=MessageType.EVALUATE,
    )

    reply = app(evaluate, context)

    assert not reply.content.array_records
    assert set(reply.content["metrics"]) == {
        "num-examples",
        "val-ndcg",
        "val-hr",
        "test-ndcg",
        "test-hr",
        "val-full-ndcg",
        "val-full-recall",
        "test-full-ndcg",
        "test-full-recall",
    }
    assert _strings_in(reply) == ["m00"]


def test_the_head_persists_between_rounds_in_context_state():
    run_config = in_process_config(RUN, server_loop=False)
    context = _context(run_config, {"partition-id": 2, "num-partitions": 3})

    app(_train_message(run_config, 1), context)
    first = context.state[LOCAL_STATE_KEY]["head.item_bias.weight"].numpy().copy()
    app(_train_message(run_config, 2), context)
    second = context.state[LOCAL_STATE_KEY]["head.item_bias.weight"].numpy()

    assert first.shape == second.shape
    assert (first != second).any()


def test_a_market_starts_from_the_global_weight_blend_of_received_and_own_arrays():
    # Prepare: the market trained once, so it holds its own copy of the shared arrays.
    run_config = in_process_config(RUN, server_loop=False, **{"global-weight": 0.25})
    context = _context(run_config, {"partition-id": 2, "num-partitions": 3})
    reply = app(_train_message(run_config, 1), context)
    sent = reply.content["arrays"].to_torch_state_dict()
    own = context.state[OWN_ARRAYS_KEY].to_torch_state_dict()
    received = {name: value + 1.0 for name, value in sent.items()}

    # Execute
    blended = blend_with_own(received, context, config_from_context(context))

    # Assert: the own copy is exactly what the market sent; a quarter of the received arrays is mixed in.
    for name in sent:
        assert torch.equal(own[name], sent[name])
        torch.testing.assert_close(blended[name], 0.25 * received[name] + 0.75 * own[name])


def test_with_global_weight_one_a_market_keeps_no_copy_and_takes_the_received_arrays():
    run_config = in_process_config(RUN, server_loop=False)
    context = _context(run_config, {"partition-id": 2, "num-partitions": 3})
    app(_train_message(run_config, 1), context)
    received = {"encoder.tower.bias": torch.ones(8)}

    assert OWN_ARRAYS_KEY not in context.state
    assert blend_with_own(received, context, config_from_context(context)) is received


@pytest.mark.parametrize("key", ["global-weight", "dp-global-weight"])
def test_a_global_weight_outside_zero_to_one_is_refused(key):
    context = _context(
        in_process_config(RUN, server_loop=False, **{key: 1.5}), {"partition-id": 2, "num-partitions": 3}
    )

    with pytest.raises(ValueError, match=f"{key} must lie between 0 and 1, got 1.5"):
        config_from_context(context)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("dp-epsilon", -1.0, "dp-epsilon must be 0 (no DP) or a positive budget"),
        ("dp-delta", 1.0, "dp-delta must be 0"),
        ("dp-max-grad-norm", 0.0, "dp-max-grad-norm must be positive"),
        ("dp-learning-rate", -0.01, "dp-learning-rate must be positive"),
        ("dp-batch-size", 0, "dp-batch-size must be positive"),
        ("dp-user-positives", 0, "dp-user-positives must be positive"),
        ("dp-popularity-share", 1.0, "dp-popularity-share must lie in [0, 1)"),
        ("dp-accountant", "gdp", "Unknown dp-accountant 'gdp'"),
    ],
)
def test_a_bad_privacy_setting_is_refused_by_name(key, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RunConfig.from_run_config(in_process_config(RUN, server_loop=False, **{key: value}))


def test_the_server_refuses_a_bad_market_setting_before_any_round(tmp_path):
    run_config = in_process_config(RUN, server_loop=False, **{"dp-popularity-share": 1.5, "out-dir": str(tmp_path)})
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)

    with pytest.raises(ValueError, match=re.escape("dp-popularity-share must lie in [0, 1)")):
        server_main(grid=None, context=context)

    assert not any(tmp_path.iterdir())  # nothing written, nothing started


def test_a_deployed_market_reads_its_own_file_through_the_company_catalog(tmp_path):
    # Prepare: a region's file and the catalog, as a SuperNode's node config names them.
    paths = write_markets(SyntheticConfig(markets=2, seed=0), tmp_path)
    catalog_path = tmp_path / "catalog.txt"
    MarketSource("", 2, 0).catalog().save(catalog_path)
    # The server's copy of the catalog, for its initial arrays.
    run_config = in_process_config(RUN, server_loop=False, **{"catalog-path": str(catalog_path)})
    node = {"market": "m01", "data-path": str(paths["m01"]), "catalog-path": str(catalog_path)}

    reply = app(_train_message(run_config), _context(run_config, node))

    assert _strings_in(reply) == ["m01"]
    assert reply.content["metrics"]["num-examples"] > 0
    assert Catalog.load(catalog_path).size == next(iter(reply.content["arrays"].values())).shape[0]


def test_a_deployed_market_without_a_catalog_is_told_so(tmp_path):
    paths = write_markets(SyntheticConfig(markets=1, seed=0), tmp_path)
    run_config = in_process_config(RUN, server_loop=False)
    node = {"market": "m00", "data-path": str(paths["m00"])}

    with pytest.raises(RegionError, match="needs the company catalog"):
        app(_train_message(run_config), _context(run_config, node))


@pytest.mark.parametrize("exists", [True, False])
def test_a_deployed_market_never_reads_a_path_the_server_sends(tmp_path, exists):
    # Prepare: the run config names a catalog path on the region's host; the
    # region's answer must not reveal whether that file exists there.
    paths = write_markets(SyntheticConfig(markets=1, seed=0), tmp_path)
    probe = tmp_path / "probe.txt"
    if exists:
        MarketSource("", 1, 0).catalog().save(probe)
    run_config = in_process_config(RUN, server_loop=False, **{"catalog-path": str(probe), "synthetic-markets": 1})
    node = {"market": "m00", "data-path": str(paths["m00"])}
    message = _train_message(in_process_config(RUN, server_loop=False, **{"synthetic-markets": 1}))

    # Execute
    with pytest.raises(RegionError) as raised:
        app(message, _context(run_config, node))

    # Assert: the same answer either way, naming the node config.
    assert "set catalog-path in its node config" in str(raised.value)
    assert str(tmp_path) not in str(raised.value)


def test_an_error_reply_names_the_file_and_line_but_no_value_of_it(tmp_path):
    # Prepare: a bad rating on line 3 of a region's file, next to a user ID.
    catalog_path = tmp_path / "catalog.txt"
    MarketSource("", 1, 0).catalog().save(catalog_path)
    data = tmp_path / "regions" / "m00_5core.txt"
    data.parent.mkdir()
    data.write_text("userId itemId rating date\nU1 i1 5 2020-01-01\nSECRETUSER42 i2 notanumber 2020-01-02\n")
    run_config = in_process_config(
        RUN, server_loop=False, **{"catalog-path": str(catalog_path), "synthetic-markets": 1}
    )
    node = {"market": "m00", "data-path": str(data), "catalog-path": str(catalog_path)}

    # Execute
    with pytest.raises(RegionError) as raised:
        app(_train_message(run_config), _context(run_config, node))

    # Assert: what the server gets names the file and the line, not the value or the user.
    reason = str(raised.value)
    assert "m00_5core.txt line 3" in reason
    assert "SECRETUSER42" not in reason and "notanumber" not in reason
    assert str(data.parent) not in reason


def test_the_last_fedper_ft_evaluation_fine_tunes_a_private_fork():
    run_config = in_process_config(RUN, server_loop=False, method="fedper-ft", **{"fine-tune-epochs": 2})
    context = _context(run_config, {"partition-id": 0, "num-partitions": 3})
    app(_train_message(run_config), context)
    head_before = context.state[LOCAL_STATE_KEY]["head.item_bias.weight"].numpy().copy()
    final = final_evaluate_config(RunConfig.from_run_config(run_config))
    message = _train_message(run_config)
    evaluate = Message(
        content=RecordDict({"arrays": message.content["arrays"], "config": final}),
        dst_node_id=7,
        message_type=MessageType.EVALUATE,
    )

    reply = app(evaluate, context)

    metrics = reply.content["metrics"]
    assert {"ft-epochs", "ft-val-ndcg", "ft-test-ndcg", "ft-val-hr", "ft-test-hr"} <= set(metrics)
    assert metrics["ft-val-ndcg"] >= metrics["val-ndcg"]
    assert not reply.content.array_records
    assert (context.state[LOCAL_STATE_KEY]["head.item_bias.weight"].numpy() == head_before).all()


# Per-market budgets: set by the run for named markets, capped by each region's node config.

PRIVATE_RUN = {"dp-epsilon": 8.0, "dp-accountant": "rdp", "num-server-rounds": 1}  # one round spends it all


def _trained(run_config: dict, context: Context, server_round: int = 1) -> dict:
    """The metrics of the market's reply to one train message."""
    return dict(app(_train_message(run_config, server_round), context).content["metrics"])


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
        RunConfig.from_run_config(
            in_process_config(RUN, server_loop=False, **PRIVATE_RUN, **{"dp-market-epsilons": text})
        )


def test_market_epsilons_without_dp_for_the_others_are_refused():
    with pytest.raises(ValueError, match="dp-market-epsilons needs dp-epsilon > 0"):
        RunConfig.from_run_config(
            in_process_config(RUN, server_loop=False, **{"dp-epsilon": 0.0, "dp-market-epsilons": "m01=2"})
        )


def test_a_named_market_spends_its_own_budget_and_the_others_the_run_budget():
    # Prepare
    run_config = in_process_config(RUN, server_loop=False, **PRIVATE_RUN, **{"dp-market-epsilons": "m01=2"})

    # Execute
    named = _trained(run_config, _context(run_config, {"partition-id": 1, "num-partitions": 3}))
    other = _trained(run_config, _context(run_config, {"partition-id": 0, "num-partitions": 3}))

    # Assert
    assert 1.9 < named["epsilon"] <= 2.0
    assert 7.6 < other["epsilon"] <= 8.0


def test_a_region_caps_the_run_budget_with_its_node_config():
    run_config = in_process_config(RUN, server_loop=False, **PRIVATE_RUN)

    capped = _trained(run_config, _context(run_config, {"partition-id": 1, "num-partitions": 3, "dp-epsilon": 1}))

    assert 0.95 < capped["epsilon"] <= 1.0


def test_a_regions_cap_never_raises_the_run_budget():
    run_config = in_process_config(RUN, server_loop=False, **PRIVATE_RUN, **{"dp-market-epsilons": "m01=2"})

    metrics = _trained(run_config, _context(run_config, {"partition-id": 1, "num-partitions": 3, "dp-epsilon": 5.0}))

    assert 1.9 < metrics["epsilon"] <= 2.0


def test_a_region_caps_the_run_delta_with_its_node_config():
    run_config = in_process_config(RUN, server_loop=False, **PRIVATE_RUN)

    capped = _trained(run_config, _context(run_config, {"partition-id": 1, "num-partitions": 3, "dp-delta": "1e-6"}))

    assert capped["delta"] == 1e-6
    assert 7.6 < capped["epsilon"] <= 8.0


def test_a_regions_delta_cap_never_raises_the_default_delta():
    # Prepare: the run leaves delta at its default, 0.1 / the market's released user count.
    run_config = in_process_config(RUN, server_loop=False, **PRIVATE_RUN)
    context = _context(run_config, {"partition-id": 1, "num-partitions": 3, "dp-delta": 0.5})

    # Execute
    metrics = _trained(run_config, context)

    # Assert
    released = MarketPrivacy(context, "m01").load().calibration[RELEASED_USERS]
    assert metrics["delta"] == pytest.approx(0.1 / released)


@pytest.mark.parametrize(
    ("ceiling", "message"),
    [
        ({"dp-delta": "tiny"}, "the node config's dp-delta must be a number between 0 and 1, got 'tiny'"),
        ({"dp-delta": 1.0}, "the node config's dp-delta must be a number between 0 and 1, got '1.0'"),
        ({"dp-epsilon": "-2"}, "the node config's dp-epsilon must be a positive number, got '-2'"),
    ],
)
def test_a_bad_ceiling_in_the_node_config_is_refused_by_its_key(ceiling, message):
    run_config = in_process_config(RUN, server_loop=False, **PRIVATE_RUN)
    context = _context(run_config, {"partition-id": 1, "num-partitions": 3, **ceiling})

    with pytest.raises(RegionError, match=re.escape(f"Market 'm01': {message}")):
        _trained(run_config, context)


@pytest.mark.parametrize("ceiling", [{"dp-epsilon": 1.0}, {"dp-delta": "1e-6"}])
def test_a_region_that_demands_dp_refuses_a_run_without_it(ceiling):
    run_config = in_process_config(RUN, server_loop=False)
    context = _context(run_config, {"partition-id": 1, "num-partitions": 3, **ceiling})
    ((key, value),) = ceiling.items()

    with pytest.raises(
        RegionError, match=re.escape(f"Market 'm01' trains only under DP ({key}={float(value):g} in its node")
    ):
        _trained(run_config, context)


def test_a_cap_lowered_during_the_training_stops_the_market():
    # Prepare: round 1 of 2 under the run's budget alone.
    run_config = in_process_config(RUN, server_loop=False, **{**PRIVATE_RUN, "num-server-rounds": 2})
    context = _context(run_config, {"partition-id": 1, "num-partitions": 3})
    first = _trained(run_config, context, server_round=1)

    # Execute: the region now allows no more than it already spent.
    context.node_config["dp-epsilon"] = first["epsilon"]
    second = _trained(run_config, context, server_round=2)

    # Assert
    assert first["trained"] == 1 and second["trained"] == 0
    assert second["epsilon"] == pytest.approx(first["epsilon"])
    assert second["num-examples"] == 0


def test_a_delta_cap_lowered_during_the_training_stops_the_market_and_reports_at_the_new_delta():
    # Prepare: round 1 of 2 at the default delta.
    run_config = in_process_config(RUN, server_loop=False, **{**PRIVATE_RUN, "num-server-rounds": 2})
    context = _context(run_config, {"partition-id": 1, "num-partitions": 3})
    first = _trained(run_config, context, server_round=1)

    # Execute: the region now allows a far smaller delta.
    context.node_config["dp-delta"] = 1e-12
    second = _trained(run_config, context, server_round=2)

    # Assert: the market stops; round 1's steps, counted at the new delta, are reported as they are.
    assert second["trained"] == 0
    assert second["delta"] == 1e-12 < first["delta"]
    assert second["epsilon"] > 8.0 >= first["epsilon"]


# --- which head a deployed region starts a training from ----------------------------------------------


@pytest.mark.parametrize(
    ("training", "continues", "restored"),
    [("t1", "", True), ("t2", "", False), ("t2", "t1", True), ("t2", "t0", False)],
)
def test_a_region_starts_a_new_training_from_a_new_head_unless_it_continues_one(
    tmp_path, training, continues, restored
):
    # Prepare: training t1 trained a round and saved its head in the region's state-dir.
    from clients.local_model import build_local_model
    from clients.state_store import MarketStateStore

    run_config = in_process_config(RUN, server_loop=False)
    node = {"partition-id": 1, "num-partitions": 3, "state-dir": str(tmp_path)}
    first = _train_message(run_config)
    first.content["config"][TRAINING_ID_KEY] = "t1"
    app(first, _context(run_config, node))
    saved = MarketStateStore(tmp_path, MarketSource("", 3, 0).markets[1]).load().head["head.item_bias.weight"]

    # Execute: a SuperNode (restarted: a fresh context) gets a message of the same training, of a new
    # training from scratch, of one continuing t1, and of one continuing a training it has no head of.
    message = _train_message(run_config)
    message.content["config"][TRAINING_ID_KEY], message.content["config"][CONTINUES_KEY] = training, continues
    model = build_local_model(message, _context(run_config, node))[0]

    # Assert: only the same training and a continuation of t1 start from t1's head.
    assert torch.equal(model.head.item_bias.weight.detach(), saved) == restored
