"""ClientApp: a market trains on its private data and shares only the encoder.

The market learns which data is its own from node config: ``market`` and
``data-path`` on a deployed SuperNode, ``partition-id`` in simulation. Its
head (user embeddings, history projection, popularity bias) lives in
``context.state`` between rounds and never enters a reply.
"""

from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common.catalog import Catalog
from common.markets import MarketSource, load_file_split, load_split, market_seed
from common.methods import fine_tune, get_method, local_round
from common.model import ModelConfig, SplitRecommender, get_arrays, set_arrays, shared_parameter_names
from common.split import MarketSplit
from common.train import MarketTensors, TrainConfig, evaluate

LOCAL_STATE_KEY = "local-parameters"  # head parameters kept in context.state
MARKET_KEY = "market"  # the ConfigRecord naming the replying market


@dataclass(frozen=True)
class ClientConfig:
    """Run settings a market needs before it sees any message."""

    method: str  # federated method; decides which parameters are shared
    embedding_dim: int  # must match the server's encoder
    history_length: int  # training items pooled into a user's vector
    user_embeddings: bool  # a free vector per user besides the pooled history
    data_dir: str  # simulation: directory of market files, empty for synthetic
    synthetic_markets: int  # simulation without data-dir: markets to generate
    catalog_path: str  # the company catalog; simulation builds one when empty
    seed: int  # seeds splits, negatives, initial heads and local shuffling

    @classmethod
    def from_context(cls, context: Context) -> "ClientConfig":
        """Read the run config, letting node config name the catalog of a region."""
        run = context.run_config
        return cls(
            method=str(run["method"]),
            embedding_dim=int(run["embedding-dim"]),
            history_length=int(run["history-length"]),
            user_embeddings=bool(run["user-embeddings"]),
            data_dir=str(run["data-dir"]),
            synthetic_markets=int(run["synthetic-markets"]),
            catalog_path=str(context.node_config.get("catalog-path", run["catalog-path"])),
            seed=int(run["seed"]),
        )


def resolve_market(context: Context, config: ClientConfig) -> tuple[MarketSplit, Catalog]:
    """This node's market split and the catalog it maps items through."""
    node = context.node_config
    if "market" in node:
        if "data-path" not in node:
            raise ValueError(f"The node config names market '{node['market']}' but gives no data-path.")
        if not config.catalog_path:
            raise ValueError(
                "A deployed market needs the company catalog: set catalog-path in the "
                "node config or the run config."
            )
        catalog = _load_catalog(config.catalog_path)
        market = str(node["market"])
        return load_file_split(str(node["data-path"]), market, catalog, config.seed), catalog
    source = MarketSource(config.data_dir, config.synthetic_markets, config.seed)
    markets = source.markets
    partition = int(node["partition-id"])
    if partition >= len(markets):
        raise ValueError(
            f"Partition {partition} has no market: the source has {len(markets)} markets, "
            "so run with as many SuperNodes."
        )
    catalog = _load_catalog(config.catalog_path) if config.catalog_path else source.catalog()
    return load_split(source, markets[partition], catalog), catalog


@cache
def _load_catalog(path: str) -> Catalog:
    return Catalog.load(path)


_tensors: dict[tuple[str, int], MarketTensors] = {}


def _market_tensors(split: MarketSplit, history_length: int) -> MarketTensors:
    key = (split.market, history_length)
    if key not in _tensors or _tensors[key].split is not split:
        _tensors[key] = MarketTensors.from_split(split, history_length)
    return _tensors[key]


def build_local_model(
    msg: Message, context: Context
) -> tuple[SplitRecommender, MarketTensors, ClientConfig, list[str]]:
    """The market's model: received arrays over its saved (or freshly seeded) head."""
    config = ClientConfig.from_context(context)
    split, catalog = resolve_market(context, config)
    data = _market_tensors(split, config.history_length)
    torch.manual_seed(market_seed(split.market, config.seed))
    model = SplitRecommender(
        ModelConfig(
            catalog.size, split.num_users, config.embedding_dim, config.history_length, config.user_embeddings
        )
    )
    shared = shared_parameter_names(model, get_method(config.method).share_head)
    if LOCAL_STATE_KEY in context.state:
        set_arrays(model, context.state[LOCAL_STATE_KEY].to_torch_state_dict())
    received = msg.content["arrays"].to_torch_state_dict()
    if set(received) != set(shared):
        raise ValueError(
            f"Market '{split.market}' expected the arrays {sorted(shared)} from the server "
            f"but received {sorted(received)}; do server and client use the same method?"
        )
    set_arrays(model, received)
    return model, data, config, shared


def _reply(msg: Message, market: str, metrics: dict[str, Any], arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics), MARKET_KEY: ConfigRecord({"name": market})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=msg)


app = ClientApp()


def train_config_from(record: ConfigRecord) -> TrainConfig:
    """The round's local training settings as the server sent them."""
    return TrainConfig(
        epochs=int(record["local-epochs"]),
        head_epochs=int(record["head-epochs"]),
        batch_size=int(record["batch-size"]),
        learning_rate=float(record["learning-rate"]),
        negatives=int(record["negatives"]),
        score_penalty=float(record["score-penalty"]),
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training; replies with the shared arrays and metrics only."""
    model, data, config, shared = build_local_model(msg, context)
    round_config = msg.content["config"]
    market = data.split.market
    seed = market_seed(market, config.seed) + 1000 * int(round_config["server-round"])
    method = get_method(config.method)
    loss = local_round(model, data, method, train_config_from(round_config), seed)
    local = [name for name in model.state_dict() if name not in shared]
    context.state[LOCAL_STATE_KEY] = ArrayRecord(get_arrays(model, local))
    valid = evaluate(model, data)
    metrics = {
        "num-examples": data.split.num_train,
        "train-loss": loss,
        "val-ndcg": valid.ndcg,
        "val-hr": valid.hit_rate,
    }
    return _reply(msg, market, metrics, ArrayRecord(get_arrays(model, shared)))


@app.evaluate()
def evaluate_market(msg: Message, context: Context) -> Message:
    """Validation and test metrics with the received encoder and the local head.

    When the server asks for it (``fine-tune-epochs`` > 0, after the last
    round of fedper-ft), the market also fine-tunes a private fork and reports
    the fork's metrics at its best epoch on validation.
    """
    model, data, config, _ = build_local_model(msg, context)
    valid = evaluate(model, data)
    test = evaluate(model, data, on_test=True)
    metrics = {
        "num-examples": test.users,
        "val-ndcg": valid.ndcg,
        "val-hr": valid.hit_rate,
        "test-ndcg": test.ndcg,
        "test-hr": test.hit_rate,
    }
    round_config = msg.content["config"]
    if int(round_config.get("fine-tune-epochs", 0)) > 0:
        seed = market_seed(data.split.market, config.seed) + 999_999
        tuned = fine_tune(
            model, data, train_config_from(round_config), int(round_config["fine-tune-epochs"]), seed
        )
        metrics.update(
            {
                "ft-epochs": tuned.epochs,
                "ft-val-ndcg": tuned.valid.ndcg,
                "ft-val-hr": tuned.valid.hit_rate,
                "ft-test-ndcg": tuned.test.ndcg,
                "ft-test-hr": tuned.test.hit_rate,
            }
        )
    return _reply(msg, data.split.market, metrics)
