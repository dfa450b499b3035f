"""fedals' minimum-buyers rule: what leaves a market, who may set the threshold, and the reconstruction attack."""

from pathlib import Path

import numpy as np
import pytest

from common.data.markets import MarketSource, load_split
from common.ials.core import MarketInteractions, initial_item_gram
from common.ials.model import initial_rows
from common.ials.steps import market_item_statistics, solve_items, solve_users
from common.ials.wire import ASSORTMENT_KEY, INITIAL_ROWS_KEY, unpack_statistics
from common.run_config import RunConfig
from simulations.attacks.hostile import HostileServer
from simulations.attacks.settings import AttackSettings
from tests.in_process import run_config as in_process_config

MARKETS = 2
SOURCE = MarketSource("", MARKETS, 0)
FACTORS = 8

pytestmark = [pytest.mark.usefixtures("server_task_identity"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]


RUN = {
    "method": "fedals",
    "serve-refit": False,  # the exchanges are kept by round number; a refit's rounds restart at 1
    "synthetic-markets": MARKETS,
    "als-factors": FACTORS,
    "num-server-rounds": 3,
    "min-nodes": MARKETS,
    "poll-interval": 0.001,
}


def _first_reply(run_config: dict, node_extra: dict | None = None, node: int = 1) -> dict[str, np.ndarray]:
    """The real ClientApp's reply arrays to the round-1 message of an honest server."""
    nodes = [{"partition-id": p, "num-partitions": MARKETS, **(node_extra or {})} for p in range(MARKETS)]
    hostile = HostileServer(run_config, nodes)
    config = RunConfig.from_run_config(run_config).ials_config()
    gram = initial_item_gram(SOURCE.catalog().size, config.factors, config.seed, config.init_std)
    arrays, _ = hostile.arrays(
        node,
        "train",
        {"gram": gram.astype(np.float32)},
        {"server-round": 1, INITIAL_ROWS_KEY: True, "training-id": "t-1"},
    )
    return arrays


def _buyers(market: str) -> tuple[np.ndarray, np.ndarray]:
    split = load_split(SOURCE, market, SOURCE.catalog())
    return np.unique(split.train_items, return_counts=True)


def _round_one_users(run_config: dict):
    """Market m01's iALS settings, split, training interactions and users as it solves them in round 1."""
    config = RunConfig.from_run_config(run_config).ials_config()
    catalog = SOURCE.catalog()
    split = load_split(SOURCE, "m01", catalog)
    train = MarketInteractions(split.train_users, split.train_items, split.num_users)
    users = solve_users(
        train,
        initial_rows(split.market_items, config),
        initial_item_gram(catalog.size, config.factors, config.seed, config.init_std),
        catalog.size,
        config,
    )
    return config, split, train, users


# --- (a) the attack of the review, against the real reply: fails on the code before the rule.


def test_the_sole_buyer_attack_on_a_real_reply_exposes_no_user():
    # Prepare: what market m01 computes in round 1 (its seeded rows, the initial Gram), to know
    # each user's true z_u = [√α·x_u, (1+α)/√α]; then the reply it actually sends.
    run_config = in_process_config(RUN, server_loop=False)
    config, split, train, users = _round_one_users(run_config)
    alpha = config.alpha
    truth = np.hstack([np.sqrt(alpha) * users, np.full((len(users), 1), (1 + alpha) / np.sqrt(alpha))])
    rows, buyers = _buyers("m01")
    sole_buyers = len(np.unique(split.train_users[np.isin(split.train_items, rows[buyers == 1])]))

    # Execute: the attacker reads every rank-1 factor as ±z_u (sign: the last coordinate is positive).
    statistics = unpack_statistics({k: v for k, v in _first_reply(run_config).items() if k != ASSORTMENT_KEY})
    starts = np.concatenate([[0], np.cumsum(statistics.ranks)[:-1]]).astype(int)
    recovered = np.array(
        [
            statistics.rows[s] * np.sign(statistics.rows[s][-1])
            for s, r in zip(starts, statistics.ranks, strict=True)
            if r == 1
        ]
    ).reshape(-1, FACTORS + 1)
    distance = np.linalg.norm(truth[:, None, :] - recovered[None, :, :], axis=2) if len(recovered) else np.ones((1, 1))
    exposed = int(np.sum(distance.min(axis=1) < 1e-2 * np.linalg.norm(truth, axis=1)))

    # Assert: the market has many sole buyers (so the attack had material before the rule),
    # and none of them, nor anyone else, is exposed (at most 1% of the users).
    assert sole_buyers > 0.05 * split.num_users
    assert exposed <= 0.01 * split.num_users


# --- (b) items below the threshold never leave the market.


def test_no_reply_of_any_round_holds_an_item_below_the_threshold(tmp_path):
    # Prepare: an honest training of 3 rounds; the attacker keeps every train exchange.
    from common.ials.private import DEFAULT_MIN_BUYERS
    from simulations.attacks.reconstruction import _train

    run_config = in_process_config(
        RUN, server_loop=False, **{"out-dir": str(tmp_path / "fedals"), "models-dir": str(tmp_path / "models")}
    )

    # Execute
    grid, history = _train(run_config, MARKETS, {})

    # Assert: each reply's items are exactly those with >= DEFAULT_MIN_BUYERS buyers in the market,
    # with their true counts; the assortment is the market's; from round 2 the server sends the user Gram.
    assert sorted(grid.exchanges) == [(r, n) for r in (1, 2, 3) for n in (1, 2)]
    for (server_round, node), (sent, reply) in grid.exchanges.items():
        market = SOURCE.markets[node - 1]
        rows, buyers = _buyers(market)
        kept = buyers >= DEFAULT_MIN_BUYERS
        assert 0 < kept.sum() < len(rows)  # some items sent, some kept: the rule has work to do
        np.testing.assert_array_equal(reply["items"], rows[kept])
        np.testing.assert_array_equal(reply["counts"], buyers[kept])
        np.testing.assert_array_equal(reply[ASSORTMENT_KEY], load_split(SOURCE, market, SOURCE.catalog()).market_items)
        assert ("user-gram" in sent) == (server_round > 1)
    assert [entry["round"] for entry in history["rounds"]][-1] == 3


# --- (c) who sets the threshold.


def test_the_run_config_raises_the_threshold_but_never_lowers_it():
    from common.ials.private import DEFAULT_MIN_BUYERS, min_buyers

    assert min_buyers({}, {}, "m00") == DEFAULT_MIN_BUYERS
    assert min_buyers({"als-min-buyers": 1}, {}, "m00") == DEFAULT_MIN_BUYERS
    assert min_buyers({"als-min-buyers": DEFAULT_MIN_BUYERS + 5}, {}, "m00") == DEFAULT_MIN_BUYERS + 5
    assert min_buyers({}, {"als-min-buyers": 1}, "m00") == 1
    assert min_buyers({}, {"als-min-buyers": "3"}, "m00") == 3  # a node config value may come as text
    assert min_buyers({"als-min-buyers": 4}, {"als-min-buyers": 2}, "m00") == 4  # the run may tighten the region's


@pytest.mark.parametrize("value", [0, -3, 2.5, "many", True, [2]])
@pytest.mark.parametrize("where", ["node", "run"])
def test_a_bad_threshold_is_refused_in_one_line_naming_the_key(value, where):
    from common.ials.private import min_buyers

    run, node = ({"als-min-buyers": value}, {}) if where == "run" else ({}, {"als-min-buyers": value})
    with pytest.raises(ValueError) as error:
        min_buyers(run, node, "m00")
    message = str(error.value)
    assert "als-min-buyers" in message and "\n" not in message
    assert ("node config" in message) == (where == "node")


def test_through_the_real_client_only_the_node_config_lowers_the_threshold():
    # Prepare: the touched items of m01 and their buyers.
    from common.ials.private import DEFAULT_MIN_BUYERS

    rows, buyers = _buyers("m01")

    # Execute: the run config asks for 1 (ignored: it may only raise); the node config asks for 1 and for 30.
    from_run = _first_reply(in_process_config(RUN, server_loop=False, **{"als-min-buyers": 1}))
    from_node = _first_reply(in_process_config(RUN, server_loop=False), {"als-min-buyers": 1})
    raised = _first_reply(in_process_config(RUN, server_loop=False, **{"als-min-buyers": 30}), {"als-min-buyers": 1})

    # Assert
    np.testing.assert_array_equal(from_run["items"], rows[buyers >= DEFAULT_MIN_BUYERS])
    np.testing.assert_array_equal(from_node["items"], rows)
    np.testing.assert_array_equal(raised["items"], rows[buyers >= 30])


def test_a_bad_node_threshold_refuses_the_round_naming_the_key():
    from simulations.attacks.hostile import MarketRefused

    with pytest.raises(MarketRefused, match="als-min-buyers"):
        _first_reply(in_process_config(RUN, server_loop=False), {"als-min-buyers": "none"})


# --- the market-private item step is the server's solve.


def test_a_market_solves_its_private_items_as_the_server_would():
    # Prepare: one market's users from the initial factors; the server's solve of all its items
    # from its statistics alone (the federation is this market).
    from common.ials.private import solve_private_items

    config, _, train, users = _round_one_users(in_process_config(RUN, server_loop=False))
    statistics = market_item_statistics(train, users, config)
    expected = solve_items([statistics], config)

    # Execute
    private = solve_private_items(train, users, statistics.gram, config)

    # Assert: the same rows and factors, to rounding.
    np.testing.assert_array_equal(private.rows, expected.rows)
    np.testing.assert_allclose(private.factors, expected.factors, rtol=0, atol=1e-10)


# --- the shipped attack, quick: it works with the rule off and fails with it on.


def test_the_reconstruction_attack_recovers_histories_only_without_the_rule(tmp_path):
    from simulations.attacks.reconstruction import VARIANTS, attack

    # Execute
    result = attack(AttackSettings(synthetic_markets=MARKETS, quick=True, out=Path(tmp_path)))

    # Assert: the shape the suite relies on; the undefended run leaks many exact histories (the
    # attack is real), the defended one at most 1% of the users, at a small cost in NDCG@10.
    assert {"users", "exposed-users", "exact-users", "exact-fraction", "macro-ndcg@10"} <= set(result)
    assert set(result["macro-ndcg@10"]) == {"defended", "undefended"}
    assert set(result["variants"]) == set(VARIANTS) and set(result["per-market"]) == set(SOURCE.markets)
    assert result["users"] > 1000
    assert result["undefended"]["exact-fraction"] > 0.05
    assert result["exact-fraction"] <= 0.01
    for market in result["per-market"].values():
        assert market["exact-users"] <= 0.01 * market["users"]
    assert result["macro-ndcg@10"]["defended"] > result["macro-ndcg@10"]["undefended"] - 0.02
