"""fedals in a market: solve its users against the received item factors, reply with item-side sums.

Train message: the item factors of the market's assortment and the Gram ``YᵀY`` (in round 1
the Gram alone, and the market draws its seeded initial rows itself). The market solves its
users (:func:`common.ials.solve_users`), evaluates the received factors when the server folds
the evaluation into the message, and replies with :func:`common.ials_wire.pack_statistics` of its
item statistics (checked item-side with :func:`common.ials_wire.check_item_side` before they leave),
its assortment's rows and numbers. Evaluate message: the same factors, evaluated.

Nothing user-indexed is sent: user factors are solved afresh from the received items every
round and never kept, so there is no head to persist in a deployed region. The model a market
serves is the iALS factors as a split recommender (:mod:`common.ials_model`), its best
validation round written by :mod:`clients.served` at the final round, as for the other methods.
"""

import time
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message

from common.catalog import Catalog
from common.data import read_interactions
from common.ials import IALSConfig, ItemFactors, market_item_statistics, solve_users
from common.ials_wire import check_item_side, pack_statistics, unpack_item_factors
from common.ials_model import (
    ASSORTMENT_KEY,
    INITIAL_ROWS_KEY,
    IALSMarket,
    evaluate_market,
    initial_rows,
    interaction_ratings,
)
from common.market_config import MarketConfig
from common.markets import MarketSource
from common.methods import get_method
from common.model import SplitRecommender
from common.split import MarketSplit

from clients.local_model import config_from_context, resolve_market
from clients.messages import RECEIVED_PREFIX, evaluation_metrics, reply
from clients.served import FINAL_KEY, remember_if_best, write_best_model

_markets: dict[tuple[str, int, str], IALSMarket] = {}


def train(msg: Message, context: Context) -> Message:
    """One ALS iteration's market side: the user step, and the item statistics it yields for the server."""
    market, catalog, config = _market(context)
    ials = config.ials_config()
    round_config = msg.content["config"]
    server_round = int(round_config["server-round"])
    split = market.split
    items, gram = _received(msg, market, catalog, ials)
    started = time.perf_counter()
    users = solve_users(market.train, items, gram, catalog.size, ials)
    statistics = pack_statistics(market_item_statistics(market.train, users, ials), config.als_wire)
    check_item_side(statistics, market.train.items, ials.factors)
    metrics: dict[str, Any] = {"num-examples": split.num_train, "trained": int(split.num_train > 0),
                               "train-seconds": time.perf_counter() - started}
    if bool(round_config.get("evaluate-received", False)):
        # The previous round's item factors, evaluated with the users this round solved on them.
        received = _evaluate(context, market, catalog, ials, items, gram, server_round - 1,
                             str(round_config.get("training-id", "")), users)[0]
        metrics.update({RECEIVED_PREFIX + key: value for key, value in received.items()})
    sent = statistics | {ASSORTMENT_KEY: split.market_items.astype(np.int64)}
    return reply(msg, split.market, metrics, ArrayRecord({name: Array(value) for name, value in sent.items()}))


def evaluate(msg: Message, context: Context) -> Message:
    """Validation and test metrics of the received item factors; at the final round, the served model."""
    market, catalog, config = _market(context)
    ials = config.ials_config()
    round_config = msg.content["config"]
    items, gram = _received(msg, market, catalog, ials)
    metrics, model = _evaluate(context, market, catalog, ials, items, gram, int(round_config.get("server-round", 0)),
                               str(round_config.get("training-id", "")))
    if bool(round_config.get(FINAL_KEY, False)):
        write_best_model(context, model, market.tensors, catalog, get_method(config.method))
    return reply(msg, market.split.market, metrics)


def _evaluate(
    context: Context, market: IALSMarket, catalog: Catalog, ials: IALSConfig, items: ItemFactors, gram: np.ndarray,
    server_round: int, training_id: str, users: np.ndarray | None = None,
) -> tuple[dict[str, Any], SplitRecommender]:
    """The metrics of ``items`` in the market and its model, kept as the served candidate if its best round."""
    valid, test, model = evaluate_market(market, items, gram, catalog.size, ials, users)
    metrics = evaluation_metrics(valid, test)
    remember_if_best(context, model, market.split.market, server_round, metrics, training_id)
    return metrics, model


def _market(context: Context) -> tuple[IALSMarket, Catalog, MarketConfig]:
    """This node's market as iALS sees it (cached per process), its catalog and the run's settings."""
    config = config_from_context(context)
    split, catalog = resolve_market(context, config)
    # A region whose node config demands DP refuses this run, which trains without it.
    config = config.for_market(split.market, split.num_users, context.node_config)
    key = (split.market, config.history_length, config.als_confidence)
    if key not in _markets or _markets[key].split is not split:
        ratings = None if config.als_confidence == "binary" else _ratings(context, config, split, catalog)
        _markets[key] = IALSMarket.from_split(split, config.history_length, ratings)
    return _markets[key], catalog, config


def _ratings(
    context: Context, config: MarketConfig, split: MarketSplit, catalog: Catalog
) -> tuple[np.ndarray, np.ndarray]:
    """The ratings of the market's training and validation interactions, from its own file."""
    node = context.node_config
    if "market" in node:
        interactions = read_interactions(str(node["data-path"]))
    else:
        interactions = MarketSource(config.data_dir, config.synthetic_markets, config.seed).interactions(split.market)
    return interaction_ratings(split, interactions, catalog)


def _received(msg: Message, market: IALSMarket, catalog: Catalog, ials: IALSConfig) -> tuple[ItemFactors, np.ndarray]:
    """The item factors of the market's rows and the Gram the server sent, checked.

    Raises
    ------
    ValueError
        If the arrays are not what fedals' server sends, have another number of factors than
        ``als-factors``, rows outside the catalog, or values that are not finite.
    """
    name = market.split.market
    arrays = {key: array.numpy() for key, array in msg.content["arrays"].items()}
    initial = bool(msg.content["config"].get(INITIAL_ROWS_KEY, False))
    expected = {"gram"} if initial else {"items", "factors", "gram"}
    if set(arrays) != expected:
        raise ValueError(
            f"Market '{name}' expected the arrays {sorted(expected)} of fedals' server but received "
            f"{sorted(arrays)}; do server and client use the same method?"
        )
    if initial:
        items, gram = initial_rows(market.split.market_items, ials), arrays["gram"].astype(np.float64)
    else:
        items, gram = unpack_item_factors(arrays)
    dim = ials.factors
    if gram.shape != (dim, dim) or items.dim != dim:
        raise ValueError(
            f"Market '{name}': the server sent item factors of width {items.dim} and a {gram.shape} Gram, but "
            f"als-factors is {dim}; server and regions must use the same als-factors."
        )
    if len(items.rows) and (items.rows[0] < 0 or items.rows[-1] >= catalog.size):
        raise ValueError(
            f"Market '{name}': the server sent factors of rows outside its catalog of {catalog.size} rows; "
            "server and regions must use the same catalog (catalog-path)."
        )
    if not (np.isfinite(items.factors).all() and np.isfinite(gram).all()):
        raise ValueError(f"Market '{name}': the server's item factors hold NaN or infinite values.")
    return items, gram
