"""fedals end to end: equal to pooled iALS through Flower, item-side messages, refused bad replies, served models."""

import dataclasses
import io
import json
import re
from collections.abc import Callable
from uuid import uuid4

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from clients import fedals as fedals_client
from clients.client_app import app
from common.data.markets import MarketSource, load_split
from common.data.metrics import ndcg_at_k, rank_of_positive
from common.data.synthetic import SyntheticConfig, write_markets
from common.ials.core import IALSConfig, MarketInteractions
from common.ials.model import (
    ITEM_TABLE,
    HistoryHead,
    IALSMarket,
    evaluate_market,
    history_means,
    ials_recommender,
    initial_rows,
    interaction_ratings,
)
from common.ials.private import DEFAULT_MIN_BUYERS
from common.ials.reference import pooled_ials
from common.ials.steps import market_item_statistics, score_candidates, solve_users
from common.ials.wire import (
    ASSORTMENT_KEY,
    INITIAL_ROWS_KEY,
    REPLY_KEYS,
    STATISTICS_KEYS,
    check_item_side,
    pack_statistics,
)
from common.neural.train import evaluate
from common.protocol import USER_GRAM_KEY
from common.run_config import RunConfig
from common.serving.query import load_served_model
from server.fedals import FedALS
from server.history import Checkpoint, RunHistory
from server.resume import check_resumable, run_fingerprint
from server.rounds import RoundSettings, restore_strategy_state, run_rounds, strategy_state
from server.server_app import initial_arrays
from simulations import run as harness
from tests.in_process import ScriptedGrid
from tests.in_process import run_config as in_process_config
from tests.served_check import served_test_ndcg

SOURCE = MarketSource("", 3, 0)
FACTORS = 8
# Not the defaults: the log confidence needs the ratings and ν > 0 the frequency-scaled
# regularisation, so that the run exercises every input of the item step.
# float32 on the wire: the equality with pooled iALS to 1e-5 is the exact wire's (float16, the default,
# is within 5e-4 of it: tests/common/ials/test_ials.py).
ALS = {
    "als-factors": FACTORS,
    "als-regularization": 0.1,
    "als-alpha": 5.0,
    "als-nu": 0.5,
    "als-confidence": "log",
    "als-wire": "float32",
}
ROUNDS = 3

pytestmark = [pytest.mark.usefixtures("server_task_identity"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]


RUN = {"method": "fedals", "synthetic-markets": 3, "history-length": 10, "num-server-rounds": ROUNDS, **ALS}


def _ials_config() -> IALSConfig:
    return RunConfig.from_run_config(in_process_config(RUN, server_loop=False)).ials_config()


def _market(name: str, history_length: int = 10) -> IALSMarket:
    """A synthetic market with the ratings its log confidence needs."""
    catalog = SOURCE.catalog()
    split = load_split(SOURCE, name, catalog)
    return IALSMarket.from_split(split, history_length, interaction_ratings(split, SOURCE.interactions(name), catalog))


def _client(partition: int, run_config: dict, node_config: dict | None = None) -> Callable[[Message], RecordDict]:
    """The real ClientApp of one simulated market (or a deployed one with ``node_config``), keeping its context."""
    node = node_config or {"partition-id": partition, "num-partitions": 3}
    context = Context(run_id=1, node_id=partition, node_config=node, state=RecordDict(), run_config=run_config)
    return lambda message: app(message, context).content


@pytest.fixture(scope="module")
def fedals_run(tmp_path_factory):
    """One harness run: local, fedals through the real Flower simulation, and pooled iALS."""
    out = tmp_path_factory.mktemp("fedals")
    settings = [f"--set={key}={value}" for key, value in ALS.items()]
    # The regions switch the minimum-buyers rule off (their node config): fedals then equals pooled iALS.
    results = harness.main(
        [
            "--synthetic-markets",
            "3",
            "--num-server-rounds",
            str(ROUNDS),
            "--embedding-dim",
            "8",
            "--history-length",
            "10",
            "--methods",
            "local,fedals,pooled-ials",
            "--out",
            str(out),
            "--als-min-buyers",
            "1",
            *settings,
        ]
    )
    return out, results


# --- Federated equals pooled, through Flower.


def test_the_flower_run_publishes_the_item_factors_of_pooled_ials(fedals_run):
    # Prepare: pooled iALS of the same settings and iterations on the same training data.
    out, results = fedals_run
    catalog = SOURCE.catalog()
    pooled = pooled_ials([_market(m).train for m in SOURCE.markets], catalog.size, _ials_config())

    # Execute
    published = torch.load(out / "models" / "fedals" / "published.pt", weights_only=True)

    # Assert: statistics and factors cross the wire in float32 and the shared state is float32,
    # so every step rounds to ~1e-7 relative; the exact solves do not amplify it here (measured
    # 2.7e-7 for factors up to 2.0, where storing them as float32 alone costs 6e-8): 1e-5 holds.
    federated = published["arrays"][ITEM_TABLE].numpy().astype(np.float64)
    expected = pooled.item_factors.to_dense(catalog.size)
    np.testing.assert_allclose(federated, expected, rtol=0, atol=1e-5)
    assert np.abs(expected).max() > 0.1  # not trivially all zero
    assert published["method"] == "fedals" and published["embedding-dim"] == FACTORS and published["round"] == ROUNDS
    # Same factors, same evaluation: every market reports what pooled iALS reports.
    for market, metrics in results["methods"]["fedals"]["per_market"].items():
        reference = results["methods"]["pooled-ials"]["per_market"][market]
        assert metrics["ndcg@10"] == pytest.approx(reference["ndcg@10"], abs=1e-9)
        assert metrics["round"] == reference["round"]


def test_fedals_records_rounds_traffic_and_takes_part_in_the_selection(fedals_run):
    out, results = fedals_run

    rounds = [entry for entry in results["rounds"] if entry["method"] == "fedals"]
    selection = results["methods"]["selection"]

    assert [entry["round"] for entry in rounds] == list(range(1, ROUNDS + 1))
    for entry in rounds:
        for market in SOURCE.markets:
            assert entry["per_market"][market]["upload-bytes"] > 0
            assert entry["per_market"][market]["download-bytes"] > 0
    assert selection["candidates"] == ["local", "fedals"]
    assert set(results["methods"]["fedals"]) >= {"per_market", "macro", "seconds"}


def test_every_served_model_reproduces_the_test_ndcg_results_report(fedals_run):
    # Prepare: the run's own splits, to score each market's test candidates with its served model.
    out, results = fedals_run
    catalog = SOURCE.catalog()

    for method in ("fedals", "pooled-ials", "selection"):
        for market, reported in results["methods"][method]["per_market"].items():
            # Execute
            served, ndcg = served_test_ndcg(out / "models" / method / market, SOURCE, market, catalog)

            # Assert
            assert ndcg == pytest.approx(reported["ndcg@10"], abs=1e-6), (method, market)


# --- The split recommender holds iALS exactly.


def test_the_split_recommender_scores_each_known_user_with_their_ials_factor():
    # Prepare: pooled iALS on the synthetic markets; market m01 as a split recommender.
    catalog = SOURCE.catalog()
    config = _ials_config()
    markets = [_market(m) for m in SOURCE.markets]
    result = pooled_ials([m.train for m in markets], catalog.size, config)
    market, users, items = markets[1], result.user_factors[1], result.item_factors
    gram = items.gram()
    tensors = market.tensors
    means = history_means(items, tensors.history, tensors.history_mask)
    head = HistoryHead.fit(users, means)
    validation_model = ials_recommender(items, catalog.size, head, head.offsets(users, means), 10)

    # Execute
    valid, test, test_model = evaluate_market(
        market, items, gram, catalog.size, config, users, item_rows=items.held_rows()
    )

    # Assert: on validation x_u (training interactions), on test x_u folded in with the
    # validation interaction; the model's scores and NDCG@10 are iALS's on every list.
    folded = solve_users(market.with_valid, items, gram, items.held_rows(), config)
    for model, factors, eval_set, on_test, metrics in (
        (validation_model, users, market.split.valid, False, valid),
        (test_model, folded, market.split.test, True, test),
    ):
        history, mask = tensors.user_history(torch.as_tensor(eval_set.users), for_test=on_test)
        with torch.no_grad():
            scores = model(torch.as_tensor(eval_set.users), history, mask, torch.as_tensor(eval_set.candidates)).numpy()
        expected = score_candidates(factors, items, eval_set.users, eval_set.candidates)
        assert np.abs(scores - expected).max() < 1e-4
        assert metrics.ndcg == ndcg_at_k(rank_of_positive(expected))
        assert evaluate(model, tensors, on_test=on_test).ndcg == metrics.ndcg


def test_the_servers_initial_table_holds_the_rows_markets_draw_themselves():
    # Prepare: in round 1 a market is sent the Gram alone and draws its rows' seeded factors.
    run_config = in_process_config(RUN, server_loop=False)
    catalog = SOURCE.catalog()
    rows = load_split(SOURCE, "m02", catalog).market_items

    # Execute
    table = initial_arrays(RunConfig.from_run_config(run_config), catalog)[ITEM_TABLE].numpy()
    drawn = initial_rows(rows, _ials_config())

    # Assert: bit for bit, and the tower is the identity (zero).
    np.testing.assert_array_equal(table[rows], drawn.factors)
    assert table.shape == (catalog.size, FACTORS) and table.dtype == np.float32


# --- What leaves a market, and what the server accepts.


def test_a_train_reply_holds_item_side_statistics_and_numbers_only():
    # Prepare: the strategy's own round-1 message to one market (m01).
    run_config = in_process_config(RUN, server_loop=False)
    catalog = SOURCE.catalog()
    strategy = FedALS(_ials_config(), catalog.size, seeded_start=True, min_nodes=1)
    client = _client(1, run_config)
    grid = ScriptedGrid({7: client})
    config = ConfigRecord({"training-id": "t-1", "evaluate-received": True})
    arrays = initial_arrays(RunConfig.from_run_config(run_config), catalog)
    message = list(strategy.configure_train(1, arrays, config, grid))[0]
    message.metadata.__dict__["_message_id"] = uuid4().hex
    split = load_split(SOURCE, "m01", catalog)

    # Execute
    reply = Message(client(message), reply_to=message)

    # Assert: round 1 sends the Gram alone; the reply is statistics of the touched items, the
    # assortment's rows and numbers. check_item_side refuses any array that may carry a user axis.
    assert set(message.content["arrays"]) == {"gram"} and message.content["config"][INITIAL_ROWS_KEY]
    assert list(reply.content.array_records) == ["arrays"]
    payload = {name: array.numpy() for name, array in reply.content["arrays"].items()}
    assert set(payload) == set(REPLY_KEYS)
    # Only the items the market has at least DEFAULT_MIN_BUYERS buyers of are sent (common.ials.private).
    rows, buyers = np.unique(split.train_items, return_counts=True)
    check_item_side({name: payload[name] for name in STATISTICS_KEYS}, rows[buyers >= DEFAULT_MIN_BUYERS], FACTORS)
    np.testing.assert_array_equal(payload[ASSORTMENT_KEY], split.market_items)
    assert split.num_users not in {array.shape[0] for array in payload.values()}
    metrics = reply.content["metrics"]
    assert all(isinstance(value, int | float) for value in metrics.values())
    assert metrics["num-examples"] == split.num_train and "received-test-ndcg" in metrics
    strings = [value for record in reply.content.config_records.values() for value in record.values()]
    assert strings == ["m01"] and not set(strings) & set(SOURCE.interactions("m01")["user"])
    # The server learned the market's rows: next round it sends exactly those.
    aggregated, _ = strategy.aggregate_train(1, [reply])
    second = list(strategy.configure_train(2, aggregated, ConfigRecord({}), grid))[0]
    np.testing.assert_array_equal(second.content["arrays"]["items"].numpy(), split.market_items)
    assert not second.content["config"][INITIAL_ROWS_KEY]
    # With them, |I|: the rows of the whole table with a factor, as a server reading the table counts them.
    table = aggregated[ITEM_TABLE].numpy()
    assert second.content["arrays"]["item-rows"].numpy().tolist() == [np.count_nonzero(table.any(axis=1))]


def test_an_item_solved_to_zero_holds_no_factor_and_is_not_counted_in_item_rows():
    # Prepare: a market whose second user has a zero factor and alone bought row 5, so row 5's
    # statistics are zero and its solved factor is exactly zero; rows 0 and 1 get factors.
    catalog = SOURCE.catalog()
    config = _ials_config()
    strategy = FedALS(config, catalog.size, seeded_start=True, min_nodes=1)
    grid = ScriptedGrid({7: lambda message: None})
    arrays = initial_arrays(RunConfig.from_run_config(in_process_config(RUN, server_loop=False)), catalog)
    message = list(strategy.configure_train(1, arrays, ConfigRecord({}), grid))[0]
    message.metadata.__dict__["_message_id"] = uuid4().hex
    market = MarketInteractions(np.array([0, 0, 1]), np.array([0, 1, 5]), 2, ratings=np.array([5.0, 4.0, 3.0]))
    users = np.vstack([np.random.default_rng(0).normal(size=FACTORS), np.zeros(FACTORS)])
    statistics = pack_statistics(market_item_statistics(market, users, config), "float32")
    payload = statistics | {ASSORTMENT_KEY: np.array([0, 1, 5], dtype=np.int64)}
    content = RecordDict({"arrays": ArrayRecord({name: Array(value) for name, value in payload.items()})})

    # Execute
    aggregated, _ = strategy.aggregate_train(1, [Message(content, reply_to=message)])
    second = list(strategy.configure_train(2, aggregated, ConfigRecord({}), grid))[0]

    # Assert: |I| counts rows 0 and 1, as a server resuming from this table (and pooled iALS) would.
    table = aggregated[ITEM_TABLE].numpy()
    assert not table[5].any() and table[[0, 1]].any(axis=1).all()
    assert second.content["arrays"]["item-rows"].numpy().tolist() == [2]


def test_a_market_the_server_has_no_rows_for_gets_the_whole_table_and_sends_the_same_statistics():
    # Prepare: the same market twice at round 1 of a seeded training: once as a known-to-be-new node
    # (the Gram alone, initial rows drawn locally), once as a node of a training started elsewhere
    # (init-from: the server sends its whole table).
    run_config = in_process_config(RUN, server_loop=False, **{"num-server-rounds": 2})
    catalog = SOURCE.catalog()
    arrays = initial_arrays(RunConfig.from_run_config(run_config), catalog)
    config = ConfigRecord({"training-id": "t-1"})
    replies = []
    for seeded_start in (True, False):
        strategy = FedALS(_ials_config(), catalog.size, seeded_start=seeded_start, min_nodes=1)
        client = _client(2, run_config)
        message = list(strategy.configure_train(1, arrays, config, ScriptedGrid({3: client})))[0]
        message.metadata.__dict__["_message_id"] = uuid4().hex

        # Execute
        replies.append((message, client(message)))

    # Assert: the whole table (every seeded row) is sent, and the statistics do not depend on it.
    (seeded, from_seed), (whole, from_table) = replies
    assert set(seeded.content["arrays"]) == {"gram"}
    np.testing.assert_array_equal(whole.content["arrays"]["items"].numpy(), np.arange(catalog.size))
    for name in REPLY_KEYS:
        np.testing.assert_array_equal(from_seed["arrays"][name].numpy(), from_table["arrays"][name].numpy())


def _corrupt(name: str, change: Callable[[np.ndarray, int], np.ndarray]) -> Callable[[RecordDict], RecordDict]:
    def corrupt(content: RecordDict) -> RecordDict:
        if "arrays" not in content:  # an evaluation reply carries no arrays
            return content
        arrays = {key: array.numpy() for key, array in content["arrays"].items()}
        arrays[name] = change(arrays[name].copy(), SOURCE.catalog().size)
        content["arrays"] = ArrayRecord({key: Array(value) for key, value in arrays.items()})
        return content

    return corrupt


def _one_screened_round(tmp_path, grid: ScriptedGrid, strategy: FedALS, run_config: dict) -> tuple:
    """One round of the real loop, replies through the strategy's screen: the starting and the final arrays."""
    settings = RoundSettings(num_rounds=1, timeout=5.0, poll_interval=0.001, fold_evaluation=True, training_id="t-1")
    arrays = initial_arrays(RunConfig.from_run_config(run_config), SOURCE.catalog())
    final = run_rounds(
        grid,
        strategy,
        RunHistory(tmp_path, {}),
        settings,
        arrays,
        ConfigRecord({}),
        ConfigRecord(),
        arrays_problem=strategy.reply_problem,
    )
    return arrays, final


@pytest.mark.parametrize(
    ("corruption", "reason"),
    [
        pytest.param(_corrupt("items", lambda a, size: np.append(a[:-1], size)), "outside the catalog", id="rows"),
        pytest.param(
            _corrupt("factor", lambda a, size: np.where(np.arange(len(a)) == 3, np.nan, a).astype(a.dtype)),
            "non-finite",
            id="nan",
        ),
        pytest.param(
            _corrupt("gram", lambda a, size: np.zeros((FACTORS + 2, FACTORS + 2), dtype=a.dtype)),
            "Gram",
            id="gram-width",
        ),
        pytest.param(_corrupt("factor", lambda a, size: a[:-1]), "its ranks imply", id="factor-width"),
    ],
)
def test_a_malformed_reply_is_refused_with_a_warning_and_the_round_goes_on(
    tmp_path, flower_warnings, corruption, reason
):
    # Prepare: m00 is honest, m01 sends a corrupted reply; one round of the real loop.
    run_config = in_process_config(RUN, server_loop=False, **{"num-server-rounds": 1})
    catalog = SOURCE.catalog()
    honest, dishonest = _client(0, run_config), _client(1, run_config)
    grid = ScriptedGrid({1: honest, 2: lambda message: corruption(dishonest(message))})
    strategy = FedALS(_ials_config(), catalog.size, seeded_start=True, min_nodes=2)

    # Execute
    arrays, final = _one_screened_round(tmp_path, grid, strategy, run_config)

    # Assert: the warning names node, market and problem; the items were solved from m00 alone
    # (rows nobody else touched are zero), and the round was recorded.
    refusals = [r.getMessage() for r in flower_warnings if "refused the reply" in r.getMessage()]
    assert len(refusals) == 1 and "node 2" in refusals[0] and "'m01'" in refusals[0] and reason in refusals[0]
    table = final[ITEM_TABLE].numpy()
    rows, buyers = np.unique(load_split(SOURCE, "m00", catalog).train_items, return_counts=True)
    sent = rows[buyers >= DEFAULT_MIN_BUYERS]  # the rows m00 has enough buyers of to send (common.ials.private)
    np.testing.assert_array_equal(np.flatnonzero(table.any(axis=1)), sent)
    history = json.loads((tmp_path / "history.json").read_text())
    assert [entry["round"] for entry in history["rounds"]] == [0, 1]
    assert "local/num-examples" not in history["rounds"][1]["per_market"].get("m01", {})


def _declared(dtype: str, shape: tuple[int, ...], data: bytes = b"") -> Array:
    """An array whose declaration says ``dtype`` and ``shape`` whatever its bytes hold."""
    return Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=data)


def _declared_reply(**changes: Array) -> ArrayRecord:
    """An honest-looking reply of 5 items, each of one buyer, with ``changes`` put in."""
    arrays = {
        "items": Array(np.arange(5, dtype=np.int64)),
        "counts": Array(np.ones(5, dtype=np.int32)),
        "ranks": Array(np.ones(5, dtype=np.int32)),
        "factor": Array(np.ones(5 * (FACTORS + 1), dtype=np.float16)),
        "gram": Array(np.eye(FACTORS + 1, dtype=np.float32)),
        "assortment": Array(np.arange(8, dtype=np.int64)),
    }
    return ArrayRecord({**arrays, **changes})


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"assortment": _declared("int64", (10**9,))}, "more than the catalog"),
        ({"factor": _declared("float16", (10**9,))}, "full-rank factors"),
        ({"factor": _declared("float64", (45,))}, "not declared as one of"),
        ({"gram": _declared("float32", (3, 3))}, "Gram is declared"),
        ({"items": _declared("int64", (5,), b"x" * 10**6)}, "bytes, more than"),
        ({"user-factors": Array(np.zeros((3, FACTORS)))}, "unexpected 1 (['user-factors'])"),
        (
            {"items": Array(dtype="int64", shape=(5,), stype="x\n" * 9, data=Array(np.arange(5)).data)},
            "not serialised as a numpy array",
        ),
        ({"items": _declared("int64", (5,), Array(np.zeros(2**5)).data)}, "another array than it declares"),
    ],
    ids=["assortment", "factor-length", "factor-type", "gram", "bytes", "extra-key", "stype", "npy-header"],
)
def test_a_reply_declaring_more_than_its_market_may_send_is_refused_before_decoding(monkeypatch, changes, reason):
    # Prepare: a strategy over the generated catalog; decoding any array fails the test.
    strategy = FedALS(_ials_config(), SOURCE.catalog().size, seeded_start=True, min_nodes=1)
    honest = _declared_reply()
    assert strategy.reply_problem(honest, ArrayRecord()) is None  # the declarations and values of an honest shape pass
    monkeypatch.setattr(Array, "numpy", lambda self: pytest.fail("a declared-too-large reply was decoded"))

    # Execute
    problem = strategy.reply_problem(_declared_reply(**changes), ArrayRecord())

    # Assert
    assert problem is not None and reason in problem


# --- A deployed region, and DP.


def test_a_deployed_region_trains_and_writes_its_served_model_to_its_state_dir(tmp_path):
    # Prepare: the region's own file, the company catalog and a state-dir, as its node config names them.
    paths = write_markets(SyntheticConfig(markets=3, seed=0), tmp_path / "data")
    catalog_path = tmp_path / "catalog.txt"
    SOURCE.catalog().save(catalog_path)
    run_config = in_process_config(
        RUN, server_loop=False, **{"num-server-rounds": 1, "catalog-path": str(catalog_path)}
    )
    node = {
        "market": "m02",
        "data-path": str(paths["m02"]),
        "catalog-path": str(catalog_path),
        "state-dir": str(tmp_path / "state"),
    }
    catalog = SOURCE.catalog()
    strategy = FedALS(_ials_config(), catalog.size, seeded_start=True, min_nodes=1)
    grid = ScriptedGrid({5: _client(5, run_config, node)})
    settings = RoundSettings(num_rounds=1, timeout=5.0, poll_interval=0.001, fold_evaluation=True, training_id="t-1")

    # Execute: one round, then the final evaluation.
    run_rounds(
        grid,
        strategy,
        RunHistory(tmp_path / "server", {}),
        settings,
        initial_arrays(RunConfig.from_run_config(run_config), catalog),
        ConfigRecord({}),
        ConfigRecord({"final-round": True}),
        arrays_problem=strategy.reply_problem,
    )

    # Assert: the region serves fedals' model of round 1 from its state-dir, and kept nothing user-indexed to send.
    served = load_served_model(tmp_path / "state" / "models" / "t-1")  # the training's own folder
    assert served.manifest["method"] == "fedals" and served.manifest["round"] == 1
    assert served.model.config.dim == FACTORS and served.model.config.user_embeddings
    assert (tmp_path / "state" / "m02.best.pt").exists()


def test_fedals_under_market_level_dp_is_refused_up_front():
    # Market-level DP clips and noises averaged updates; fedals sums statistics instead (its DP is
    # user-level, in each market: tests/common/ials/test_dp_fedals.py).
    with pytest.raises(ValueError, match="fedals has no market-level DP: set market-dp-noise-multiplier to 0"):
        RunConfig.from_run_config(in_process_config(RUN, server_loop=False, **{"market-dp-noise-multiplier": 1.0}))


def test_a_resume_refuses_changed_als_settings():
    catalog = SOURCE.catalog()
    saved = run_fingerprint(in_process_config(RUN, server_loop=False), catalog)

    with pytest.raises(ValueError, match=re.escape("als-alpha: 5.0 -> 10.0")):
        check_resumable(
            saved,
            run_fingerprint(in_process_config(RUN, server_loop=False, **{"als-alpha": 10.0}), catalog),
            "checkpoint.pt",
        )


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("als-factors", 0, "als-factors must be a positive whole number"),
        ("als-alpha", 0.0, "als-alpha must be a positive number"),
        ("als-nu", -1.0, "als-nu must be 0"),
        ("als-confidence", "loud", "als-confidence must be one of binary, rating, log"),
    ],
)
def test_a_bad_als_setting_is_refused_by_its_key(key, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RunConfig.from_run_config(in_process_config(RUN, server_loop=False, **{key: value}))


def test_a_resumed_server_and_a_fresh_region_repeat_the_interrupted_round_exactly(tmp_path):
    # Prepare: a deployed region (m02, with a state-dir) and the default minimum of buyers, so that it solves the
    # items it keeps from its users of round 1 and the server's user Gram. Round 1 runs and is checkpointed; the
    # round-2 attempt that the crash loses runs too (it leaves the users of round 2 in the state-dir).
    paths = write_markets(SyntheticConfig(markets=3, seed=0), tmp_path / "data")
    catalog_path = tmp_path / "catalog.txt"
    SOURCE.catalog().save(catalog_path)
    run_config = in_process_config(
        {key: value for key, value in RUN.items() if key != "als-wire"},
        server_loop=False,
        **{"catalog-path": str(catalog_path)},
    )
    node = {"market": "m02", "data-path": str(paths["m02"]), "catalog-path": str(catalog_path)}
    node["state-dir"] = str(tmp_path / "state")
    catalog = SOURCE.catalog()
    config = ConfigRecord({"training-id": "t-1", "evaluate-received": True})

    def attempt(strategy, client, server_round, arrays):
        message = list(strategy.configure_train(server_round, arrays, config, ScriptedGrid({5: client})))[0]
        message.metadata.__dict__["_message_id"] = uuid4().hex
        return message, Message(client(message), reply_to=message)

    first = FedALS(_ials_config(), catalog.size, seeded_start=True, min_nodes=1)
    region = _client(5, run_config, node)
    _, reply = attempt(first, region, 1, initial_arrays(RunConfig.from_run_config(run_config), catalog))
    arrays, _ = first.aggregate_train(1, [reply])
    history = RunHistory(tmp_path / "server", {})
    history.save_checkpoint(Checkpoint(1, "t-1", arrays.to_torch_state_dict(), strategy_state(first)))
    lost_message, lost_reply = attempt(first, region, 2, arrays)

    # Execute: a new server from the checkpoint, and the region with a fresh context (a resumed run is a new run).
    checkpoint = history.load_checkpoint()
    resumed = FedALS(_ials_config(), catalog.size, seeded_start=True, min_nodes=1)
    restore_strategy_state(resumed, checkpoint.strategy_state)
    message, again = attempt(resumed, _client(5, run_config, node), 2, ArrayRecord(checkpoint.arrays))

    # Assert: the same message (the region's rows and the user Gram), the same evaluation of round 1 and the same
    # statistics; the region kept its users of the last two rounds only.
    for name, array in lost_message.content["arrays"].items():
        np.testing.assert_array_equal(message.content["arrays"][name].numpy(), array.numpy())
    assert set(message.content["arrays"]) == set(lost_message.content["arrays"]) >= {USER_GRAM_KEY}
    metrics = {key: value for key, value in again.content["metrics"].items() if "seconds" not in key}
    assert metrics == {key: value for key, value in lost_reply.content["metrics"].items() if "seconds" not in key}
    for name, array in lost_reply.content["arrays"].items():
        np.testing.assert_array_equal(again.content["arrays"][name].numpy(), array.numpy())
    assert sorted(path.name for path in (tmp_path / "state").glob("m02.fedals-users-*.pt")) == [
        "m02.fedals-users-1.pt",
        "m02.fedals-users-2.pt",
    ]


def test_a_checkpoints_fedals_state_outside_the_table_is_refused():
    # Prepare: the state of a server that knows one node's rows, then the same with a row beyond the table.
    strategy = FedALS(_ials_config(), 10, seeded_start=True, min_nodes=1)
    good = {"rows": {"5": torch.tensor([0, 3, 9])}, USER_GRAM_KEY: torch.eye(FACTORS + 1, dtype=torch.float64)}

    # Execute and assert
    strategy.load_state_dict(good)
    assert strategy.state_dict()["rows"]["5"].tolist() == [0, 3, 9]
    with pytest.raises(ValueError, match="node '5' that are not rows of this table"):
        strategy.load_state_dict({"rows": {"5": torch.tensor([0, 10])}})
    with pytest.raises(ValueError, match="user Gram is not"):
        strategy.load_state_dict({"rows": {}, USER_GRAM_KEY: torch.eye(FACTORS, dtype=torch.float64)})


def test_a_region_keeps_two_users_files_whatever_rounds_a_server_names_and_skips_other_data(tmp_path):
    # Prepare: a deployed region's market and a fresh context each time, as after a restart.
    paths = write_markets(SyntheticConfig(markets=3, seed=0), tmp_path / "data")
    node = {"market": "m02", "data-path": str(paths["m02"]), "state-dir": str(tmp_path / "state")}
    market = _market("m02")
    users = np.random.default_rng(0).normal(size=(market.split.num_users, FACTORS))

    def fresh() -> Context:
        return Context(run_id=1, node_id=5, node_config=node, state=RecordDict(), run_config={})

    # Execute: rounds named out of order, negative and absurd.
    for server_round in (3, 7, 9, 8, -2, 10**300):
        fedals_client._remember_users(fresh(), market, market.train, users * server_round % 7, server_round, "t-1")

    # Assert: round 8 and the latest before it (7) stay, 9 (a lost attempt's) went; -2 and 10³⁰⁰ were never written.
    kept = sorted(path.name for path in (tmp_path / "state").glob("m02.fedals-users-*.pt"))
    assert kept == ["m02.fedals-users-7.pt", "m02.fedals-users-8.pt"]
    np.testing.assert_array_equal(fedals_client._kept_users(fresh(), market, market.train, 7, "t-1"), users * 7 % 7)
    assert fedals_client._kept_users(fresh(), market, market.train, 8, "another training") is None
    # Users of the training are never those of a refit for serving (every interaction), nor the other way round.
    assert fedals_client._kept_users(fresh(), market, market.everything, 8, "t-1") is None
    # Users solved on other data (a market whose file changed while the server was down) are not used.
    changed = MarketInteractions(market.train.users, market.train.items[::-1].copy(), market.train.num_users)
    other = dataclasses.replace(market, train=changed)  # the same market and users, other interactions
    assert fedals_client._kept_users(fresh(), other, other.train, 8, "t-1") is None


def test_a_checkpoints_fedals_state_keeps_whole_table_nodes_as_a_list():
    # Prepare: one node with some rows, one with the whole table (DP without a product list).
    strategy = FedALS(_ials_config(), 10, seeded_start=True, min_nodes=1)
    strategy.load_state_dict({"rows": {"5": torch.tensor([1, 2])}, "whole-table": torch.tensor([6])})

    # Execute
    state = strategy.state_dict()

    # Assert: the whole table is not copied into the checkpoint, and comes back as every row.
    assert set(state["rows"]) == {"5"} and state["whole-table"].tolist() == [6]
    resumed = FedALS(_ials_config(), 10, seeded_start=True, min_nodes=1)
    resumed.load_state_dict(state)
    assert resumed.state_dict()["whole-table"].tolist() == [6]
    with pytest.raises(ValueError, match="not rows of this table"):
        resumed.load_state_dict({"rows": {"5": torch.tensor([1.0, 2.0])}})


def _gram_as_npy_version_3(content: RecordDict) -> RecordDict:
    """A train reply with its Gram serialised as .npy version 3.0, which numpy.load reads."""
    if "arrays" not in content:  # the evaluate reply
        return content
    record = content["arrays"]
    gram = record["gram"].numpy()
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, gram, version=(3, 0))
    record["gram"] = Array(dtype=str(gram.dtype), shape=gram.shape, stype="numpy.ndarray", data=buffer.getvalue())
    return content


def test_a_dp_release_in_any_npy_version_the_screen_reads_is_aggregated(tmp_path, flower_warnings):
    # Prepare: two markets under DP; m01 serialises its release's Gram as .npy 3.0. The screen
    # decodes DP releases with numpy.load, which reads 3.0, so the aggregation must read it too.
    run_config = in_process_config(RUN, server_loop=False, **{"num-server-rounds": 1, "dp-epsilon": 8.0})
    catalog = SOURCE.catalog()
    honest, private = _client(0, run_config), _client(1, run_config)
    grid = ScriptedGrid({1: honest, 2: lambda message: _gram_as_npy_version_3(private(message))})
    strategy = FedALS(_ials_config(), catalog.size, seeded_start=True, min_nodes=2, private=True)

    # Execute
    arrays, final = _one_screened_round(tmp_path, grid, strategy, run_config)

    # Assert: no reply refused, the round aggregated both releases into a new table.
    assert not [r for r in flower_warnings if "refused the reply" in r.getMessage()]
    assert not np.array_equal(final[ITEM_TABLE].numpy(), arrays[ITEM_TABLE].numpy())
