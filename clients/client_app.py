"""ClientApp: a market trains on its private data and shares only the encoder.

The market learns which data is its own from node config: ``market`` and
``data-path`` on a deployed SuperNode, ``partition-id`` in simulation. Its
head (user embeddings, history projection, popularity bias) lives in
``context.state`` between rounds and never enters a reply; with
``state-dir`` in node config, the head, the privacy ledger and the last
round are also saved there after every round (see ``clients.state_store``).
"""

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cache
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log

from common.catalog import Catalog
from common.config import from_kebab_case
from common.markets import MarketSource, load_file_split, load_split, market_seed
from common.methods import fine_tune, get_method, local_round
from common.model import ModelConfig, SplitRecommender, get_arrays, set_arrays, shared_parameter_names
from common.privacy import ACCOUNTANTS, PrivacyLedger, default_delta
from common.private_train import (
    market_budget,
    popularity_seed,
    privacy_units,
    private_round,
    private_round_steps,
    private_steps,
    start_private_training,
    train_epochs_private,
)
from common.split import MarketSplit
from common.train import MarketTensors, TrainConfig, evaluate

from clients.state_store import MarketState, MarketStateStore

LOCAL_STATE_KEY = "local-parameters"  # head parameters kept in context.state
PRIVACY_KEY = "privacy-ledger"  # the market's DP ledger kept in context.state
OWN_ARRAYS_KEY = "own-shared-arrays"  # the market's last trained copy of the shared arrays (global weight < 1)
MARKET_KEY = "market"  # the ConfigRecord naming the replying market
# Node config keys by which a region caps every run's DP budget: (exclusive upper bound, what is expected).
NODE_CEILINGS = {"dp-delta": (1.0, "a number between 0 and 1"), "dp-epsilon": (math.inf, "a positive number")}
RECEIVED_PREFIX = "received-"  # train reply metrics of the received model, before training (see server.rounds)


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
    num_server_rounds: int  # the run's length, over which the DP budget is spread
    fine_tune_epochs: int  # fedper-ft: the fork's epochs, part of the DP budget
    dp_epsilon: float  # 0 trains without DP; otherwise each market's budget for the whole run
    dp_market_epsilons: str  # "de=4,jp=2": named markets' own budgets in place of dp-epsilon
    dp_delta: float  # 0 picks 0.1 / users of the market (the units of privacy)
    dp_max_grad_norm: float  # per-example clipping bound of DP-SGD
    dp_batch_size: int  # expected users per DP-SGD step (Poisson): the noise on a step is sigma * clip / batch
    dp_learning_rate: float  # Adam step size under DP: fewer, less noisy steps than without DP
    dp_user_positives: int  # training items of a sampled user per DP-SGD step (one user is one example)
    dp_popularity_share: float  # share of the budget the released item popularity alone would spend; 0 releases none
    dp_accountant: str  # prv (tightest) or rdp
    global_weight: float  # share of the received arrays in a market's model; the rest is its own last trained copy
    dp_global_weight: float  # the same under DP, where the others' updates carry their noise

    def __post_init__(self) -> None:
        for key, weight in (("global-weight", self.global_weight), ("dp-global-weight", self.dp_global_weight)):
            if not 0 <= weight <= 1:
                raise ValueError(f"{key} must lie between 0 and 1, got {weight}.")
        if self.dp_epsilon < 0:
            raise ValueError(f"dp-epsilon must be 0 (no DP) or a positive budget, got {self.dp_epsilon}.")
        if parse_market_epsilons(self.dp_market_epsilons) and self.dp_epsilon == 0:
            # Under DP the average weighs a market by its users, without DP by
            # its interactions: the two cannot share one average.
            raise ValueError(
                "dp-market-epsilons needs dp-epsilon > 0: either every market trains under DP or none does."
            )
        if not 0 <= self.dp_delta < 1:
            raise ValueError(f"dp-delta must be 0 (0.1 / the market's users) or lie in (0, 1), got {self.dp_delta}.")
        for key, value in (("dp-max-grad-norm", self.dp_max_grad_norm), ("dp-learning-rate", self.dp_learning_rate),
                           ("dp-batch-size", self.dp_batch_size), ("dp-user-positives", self.dp_user_positives)):
            if not value > 0:
                raise ValueError(f"{key} must be positive, got {value}.")
        if not 0 <= self.dp_popularity_share < 1:
            raise ValueError(
                f"dp-popularity-share must lie in [0, 1): what the release leaves pays for DP-SGD, "
                f"got {self.dp_popularity_share}."
            )
        if self.dp_accountant not in ACCOUNTANTS:
            raise ValueError(f"Unknown dp-accountant '{self.dp_accountant}'; choose one of {ACCOUNTANTS}.")

    def starting_weight(self) -> float:
        """The received arrays' share in the market's model: dp-global-weight under DP."""
        return self.dp_global_weight if self.dp_epsilon > 0 else self.global_weight

    def for_market(self, market: str, num_users: int, node_config: Mapping[str, Any]) -> "ClientConfig":
        """The config with ``market``'s own budget as ``dp_epsilon`` and ``dp_delta``.

        Parameters
        ----------
        market : str
            The market's name; its ``dp-market-epsilons`` entry, if any, replaces ``dp-epsilon``.
        num_users : int
            The market's users: ``dp-delta`` 0 becomes 0.1 / ``num_users``.
        node_config : Mapping[str, Any]
            The region's node config. Its ``dp-epsilon`` and ``dp-delta``, if set, are
            ceilings the region puts on every run: the run's budget is lowered to them,
            never raised.

        Raises
        ------
        ValueError
            If a ceiling is not a number in its range, or the run trains the market
            without DP although its region demands DP.
        """
        epsilon = parse_market_epsilons(self.dp_market_epsilons).get(market, self.dp_epsilon)
        if epsilon == 0:
            demanded = [f"{key}={node_config[key]}" for key in NODE_CEILINGS if key in node_config]
            if demanded:
                raise ValueError(
                    f"Market '{market}' trains only under DP ({', '.join(demanded)} in its node config), "
                    "but this run trains without DP: set dp-epsilon in the run config."
                )
            return self
        delta = self.dp_delta or default_delta(num_users)
        if "dp-epsilon" in node_config:
            epsilon = min(epsilon, _node_ceiling(node_config, "dp-epsilon", market))
        if "dp-delta" in node_config:
            delta = min(delta, _node_ceiling(node_config, "dp-delta", market))
        return replace(self, dp_epsilon=epsilon, dp_delta=delta)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "ClientConfig":
        """Read the run config alone; raises ``ValueError`` on a bad setting."""
        return from_kebab_case(cls, run_config, "ClientApp")

    @classmethod
    def from_context(cls, context: Context) -> "ClientConfig":
        """Read the run config, letting node config name the catalog of a region."""
        run = context.run_config
        # A deployed region may keep the catalog at its own path.
        catalog_path = context.node_config.get("catalog-path", run["catalog-path"])
        return cls.from_run_config({**run, "catalog-path": catalog_path})


def _number(text: object) -> float:
    """``text`` as a float, NaN (which fails every range check) if it is not a number."""
    try:
        return float(text)
    except ValueError:
        return math.nan


def _node_ceiling(node_config: Mapping[str, Any], key: str, market: str) -> float:
    """A region's DP ceiling ``key`` (one of :data:`NODE_CEILINGS`) from its node config."""
    upper, expected = NODE_CEILINGS[key]
    value = _number(node_config[key])
    if not 0 < value < upper:
        raise ValueError(f"Market '{market}': the node config's {key} must be {expected}, got '{node_config[key]}'.")
    return value


def parse_market_epsilons(text: str) -> dict[str, float]:
    """``"de=4, jp=2"`` -> ``{"de": 4.0, "jp": 2.0}``; an empty text names no market.

    Raises
    ------
    ValueError
        If an entry is not ``market=epsilon`` with epsilon > 0, or names a market twice.
    """
    budgets: dict[str, float] = {}
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        market, _, value = (part.strip() for part in entry.partition("="))
        epsilon = _number(value)
        if not market or not epsilon > 0:
            raise ValueError(f"dp-market-epsilons takes market=epsilon pairs with epsilon > 0, got '{entry}'.")
        if market in budgets:
            raise ValueError(f"dp-market-epsilons gives market '{market}' two budgets.")
        budgets[market] = epsilon
    return budgets


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
    config = config.for_market(split.market, split.num_users, context.node_config)
    data = _market_tensors(split, config.history_length)
    torch.manual_seed(market_seed(split.market, config.seed))
    model = SplitRecommender(
        ModelConfig(
            catalog.size, split.num_users, config.embedding_dim, config.history_length, config.user_embeddings
        )
    )
    shared = shared_parameter_names(model, get_method(config.method).share_head)
    if LOCAL_STATE_KEY not in context.state:
        _restore_saved_state(context, model, split.market, str(msg.content["config"].get("training-id", "")))
    if LOCAL_STATE_KEY in context.state:
        set_arrays(model, context.state[LOCAL_STATE_KEY].to_torch_state_dict())
    received = msg.content["arrays"].to_torch_state_dict()
    if set(received) != set(shared):
        raise ValueError(
            f"Market '{split.market}' expected the arrays {sorted(shared)} from the server "
            f"but received {sorted(received)}; do server and client use the same method?"
        )
    misfits = _misfits(model, received)
    if misfits:
        raise ValueError(
            f"Market '{split.market}': the server's arrays do not fit its model ({'; '.join(misfits)}); "
            "server and regions must use the same catalog (catalog-path) and embedding-dim."
        )
    set_arrays(model, blend_with_own(received, context, config))
    return model, data, config, shared


def blend_with_own(
    received: dict[str, torch.Tensor], context: Context, config: ClientConfig
) -> dict[str, torch.Tensor]:
    """The shared arrays a market starts from: ``w * received + (1 - w) * its own last copy``.

    With ``w`` = 1 (the default without DP) this is plain FedAvg/FedPer. Under
    DP every market's update carries its DP noise, and the average of seven
    such updates moved small markets away from what their own data had taught
    them; keeping part of their own copy keeps that. The own copy is the
    market's own DP output, so blending costs no privacy. Before a market has
    trained, it starts from the received arrays alone.
    """
    weight = config.starting_weight()
    if weight == 1 or OWN_ARRAYS_KEY not in context.state:
        return received
    own = context.state[OWN_ARRAYS_KEY].to_torch_state_dict()
    return {name: weight * value + (1 - weight) * own[name] for name, value in received.items()}


def _misfits(model: SplitRecommender, arrays: dict[str, torch.Tensor]) -> list[str]:
    """The arrays the model has no place of that shape for, each with the shape it has and wants."""
    expected = model.state_dict()
    return [
        f"{name} {tuple(value.shape)} vs {tuple(expected[name].shape) if name in expected else 'none'}"
        for name, value in arrays.items()
        if name not in expected or value.shape != expected[name].shape
    ]


def state_store(context: Context, market: str) -> MarketStateStore | None:
    """The market's durable store when node config names a ``state-dir``."""
    state_dir = context.node_config.get("state-dir")
    return MarketStateStore(str(state_dir), market) if state_dir else None


def _restore_saved_state(context: Context, model: SplitRecommender, market: str, training_id: str) -> None:
    """Put the saved head (and, within the same training, the ledger) into a fresh ``context.state``."""
    store = state_store(context, market)
    saved = store.load() if store is not None else None
    if saved is None:
        return
    misfits = _misfits(model, saved.head)
    if misfits:
        log(WARNING, "Market %s: the head saved in %s does not fit this model (%s); starting with a new head.",
            market, store.path, ", ".join(misfits))
        return
    context.state[LOCAL_STATE_KEY] = ArrayRecord(saved.head)
    if saved.own_arrays is not None and not _misfits(model, saved.own_arrays):
        context.state[OWN_ARRAYS_KEY] = ArrayRecord(saved.own_arrays)
    if saved.training_id == training_id:
        if saved.ledger is not None:
            _store_ledger(context, saved.ledger)
        log(INFO, "Market %s rejoins training %s with its head and ledger from round %d.",
            market, training_id, saved.last_round)
    else:
        # A new training calibrates a new ledger; the head carries only what
        # earlier trainings released (see the README on composing budgets).
        log(INFO, "Market %s starts training %s from the head it saved in training %s (round %d).",
            market, training_id, saved.training_id, saved.last_round)


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


def local_train_config(record: ConfigRecord, config: ClientConfig) -> TrainConfig:
    """The server's settings for the round, with DP-SGD's own batch size and step size under DP."""
    train = train_config_from(record)
    if config.dp_epsilon > 0:
        return replace(
            train,
            batch_size=config.dp_batch_size,
            learning_rate=config.dp_learning_rate,
            user_positives=config.dp_user_positives,
        )
    return train


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training; replies with the shared arrays and metrics only."""
    model, data, config, shared = build_local_model(msg, context)
    round_config = msg.content["config"]
    market = data.split.market
    seed = market_seed(market, config.seed) + 1000 * int(round_config["server-round"])
    method = get_method(config.method)
    train_config = local_train_config(round_config, config)
    examples = data.split.num_train
    metrics: dict[str, Any] = {}
    if bool(round_config.get("evaluate-received", False)):
        # The previous round's evaluation, folded into this message: the
        # received encoder with the head as the previous round left it.
        received = _evaluation_metrics(model, data, _privacy_spent(context, config))
        metrics.update({RECEIVED_PREFIX + key: value for key, value in received.items()})
    started = time.perf_counter()
    if config.dp_epsilon > 0:
        # The average's weight must not be a private count: the number of
        # interactions moves with one user's history, and every market
        # receives the average. The number of users is public already (it
        # sets the sample rate, the steps and the default delta).
        examples = privacy_units(data)
        ledger = _ledger(context, config, model, data, train_config)
        if ledger.can_afford(private_round_steps(data, method, train_config)):
            loss = private_round(model, data, method, train_config, ledger, seed)
        else:
            # Out of budget: the market stops training but still evaluates, and
            # its unchanged arrays carry no weight in the average.
            log(WARNING, "Market %s is out of privacy budget (epsilon %.3f): it stops training.",
                market, ledger.epsilon())
            loss, examples = float("nan"), 0
        _store_ledger(context, ledger.state())
        metrics.update(ledger.spent())
    else:
        loss = local_round(model, data, method, train_config, seed)
    train_seconds = time.perf_counter() - started
    local = [name for name in model.state_dict() if name not in shared]
    head = get_arrays(model, local)
    context.state[LOCAL_STATE_KEY] = ArrayRecord(head)
    if config.starting_weight() < 1:
        context.state[OWN_ARRAYS_KEY] = ArrayRecord(get_arrays(model, shared))
    _persist(context, market, round_config)
    valid = evaluate(model, data)
    metrics.update(
        {
            "num-examples": examples,
            "trained": int(examples > 0),
            "train-loss": loss,
            "train-seconds": train_seconds,
            "val-ndcg": valid.ndcg,
            "val-hr": valid.hit_rate,
        }
    )
    return _reply(msg, market, metrics, ArrayRecord(get_arrays(model, shared)))


def _persist(context: Context, market: str, round_config: ConfigRecord) -> None:
    """Save the head, the ledger and the own arrays of ``context.state`` to the market's state directory, if any."""
    store = state_store(context, market)
    if store is None:
        return
    ledger = _stored_ledger(context)
    own_arrays = context.state[OWN_ARRAYS_KEY] if OWN_ARRAYS_KEY in context.state else None
    store.save(
        MarketState(
            training_id=str(round_config.get("training-id", "")),
            last_round=int(round_config["server-round"]),
            head=context.state[LOCAL_STATE_KEY].to_torch_state_dict(),
            ledger=ledger.state() if ledger is not None else None,
            own_arrays=own_arrays.to_torch_state_dict() if own_arrays is not None else None,
        )
    )


def _evaluation_metrics(model: SplitRecommender, data: MarketTensors, privacy: dict[str, float]) -> dict[str, Any]:
    """Validation and test metrics of the model as it stands, with the privacy spent under DP."""
    valid = evaluate(model, data)
    test = evaluate(model, data, on_test=True)
    return privacy | {
        "num-examples": test.users,
        "val-ndcg": valid.ndcg,
        "val-hr": valid.hit_rate,
        "test-ndcg": test.ndcg,
        "test-hr": test.hit_rate,
    }


def _store_ledger(context: Context, state: dict[str, Any]) -> None:
    context.state[PRIVACY_KEY] = ConfigRecord({"ledger": json.dumps(state)})


def _stored_ledger(context: Context) -> PrivacyLedger | None:
    if PRIVACY_KEY not in context.state:
        return None
    return PrivacyLedger.from_state(json.loads(str(context.state[PRIVACY_KEY]["ledger"])))


def _privacy_spent(context: Context, config: ClientConfig) -> dict[str, float]:
    """``epsilon`` spent in this training so far and the ``delta`` it holds at; empty without DP."""
    if config.dp_epsilon <= 0:
        return {}
    ledger = _stored_ledger(context)
    return ledger.spent() if ledger is not None else {"epsilon": 0.0, "delta": config.dp_delta}


def _ledger(
    context: Context, config: ClientConfig, model: SplitRecommender, data: MarketTensors, train: TrainConfig
) -> PrivacyLedger:
    """The market's ledger from its state; on the first round, a new one for the whole run.

    A new ledger pays for the popularity prior, which goes into ``model``'s head.
    """
    stored = _stored_ledger(context)
    if stored is not None:
        tightened = replace(
            stored.budget,
            epsilon=min(stored.budget.epsilon, config.dp_epsilon),
            delta=min(stored.budget.delta, config.dp_delta),
        )
        if tightened != stored.budget:
            # The region lowered a ceiling during the training: the noise
            # stays as calibrated, so the market stops sooner.
            log(WARNING, "Market %s: its budget is now (epsilon %.3g, delta %.3g) instead of (%.3g, %.3g).",
                data.split.market, tightened.epsilon, tightened.delta, stored.budget.epsilon, stored.budget.delta)
            stored.budget = tightened
            if (spent := stored.epsilon()) > tightened.epsilon:
                # Earlier rounds cannot be undone; the reply reports what they spent.
                log(WARNING, "Market %s has already spent epsilon %.3f at delta %.3g, over its new budget.",
                    data.split.market, spent, tightened.delta)
        return stored
    method = get_method(config.method)
    budget = market_budget(data, config.dp_epsilon, config.dp_delta, config.dp_max_grad_norm, config.dp_accountant)
    total_steps = config.num_server_rounds * private_round_steps(data, method, train)
    if method.fine_tune:
        # The fork is trained on private data too: its epochs are part of the budget.
        total_steps += private_steps(data, replace(train, epochs=config.fine_tune_epochs))
    seed = popularity_seed(data.split.market, config.seed)
    return start_private_training(model, data, budget, train, total_steps, config.dp_popularity_share, seed)


@app.evaluate()
def evaluate_market(msg: Message, context: Context) -> Message:
    """Validation and test metrics with the received encoder and the local head.

    When the server asks for it (``fine-tune-epochs`` > 0, after the last
    round of fedper-ft), the market also fine-tunes a private fork and reports
    the fork's metrics at its best epoch on validation.
    """
    model, data, config, _ = build_local_model(msg, context)
    metrics = _evaluation_metrics(model, data, _privacy_spent(context, config))
    round_config = msg.content["config"]
    if int(round_config.get("fine-tune-epochs", 0)) > 0:
        seed = market_seed(data.split.market, config.seed) + 999_999
        train_epoch = None
        if config.dp_epsilon > 0:
            ledger = _ledger(context, config, model, data, local_train_config(round_config, config))

            def train_epoch(fork: SplitRecommender, one_epoch: TrainConfig, epoch_seed: int) -> float:
                loss = train_epochs_private(fork, data, one_epoch, ledger, epoch_seed)
                _store_ledger(context, ledger.state())
                return loss

        tuned = fine_tune(
            model, data, local_train_config(round_config, config), int(round_config["fine-tune-epochs"]), seed,
            train_epoch,
        )
        if config.dp_epsilon > 0:
            metrics.update(_privacy_spent(context, config))
            _persist(context, data.split.market, round_config)
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
