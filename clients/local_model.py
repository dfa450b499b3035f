"""A market's model for one message: its data, the received shared arrays and its own head.

The market learns which data is its own from node config: ``market`` and
``data-path`` on a deployed SuperNode, ``partition-id`` in simulation. Its
head lives in ``context.state`` between rounds and, with ``state-dir`` in node
config, in the region's state directory across restarts. A simulated market
starts a training whose run config names ``init-from`` with the head of its
served model there (:mod:`clients.continued`).
"""

from dataclasses import replace
from functools import cache
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.common import log

from clients.continued import published_head
from clients.privacy_state import region_policy, require_durable_ledger, state_dir
from clients.state_store import LedgerStore, MarketState, MarketStateStore
from common.data.catalog import Catalog
from common.data.markets import MarketSource, load_file_split, load_split, market_seed
from common.data.split import MarketSplit
from common.methods import get_method
from common.neural.model import ModelConfig, SplitRecommender, set_arrays, shared_parameter_names
from common.neural.train import MarketTensors
from common.privacy.region import public_assortment
from common.protocol import ARRAYS_RECORD, CONFIG_RECORD, CONTINUES_KEY, TRAINING_ID_KEY
from common.run_config import RunConfig
from common.runtime.names import check_name
from common.runtime.sized_cache import SizedCache

LOCAL_STATE_KEY = "local-parameters"  # head parameters kept in context.state
OWN_ARRAYS_KEY = "own-shared-arrays"  # the market's last trained copy of the shared arrays (global weight < 1)


def config_from_context(context: Context) -> RunConfig:
    """The run config, with the catalog a deployed region names in its node config.

    A deployed region (``market`` in its node config) never takes a filesystem
    path from the server: the run config's ``catalog-path`` is not read there.
    """
    run = context.run_config
    deployed = "market" in context.node_config
    catalog_path = context.node_config.get("catalog-path", "" if deployed else run["catalog-path"])
    return RunConfig.from_run_config({**run, "catalog-path": str(catalog_path)})


def resolve_market(context: Context, config: RunConfig) -> tuple[MarketSplit, Catalog]:
    """This node's market split and the catalog it maps items through."""
    node = context.node_config
    if "market" in node:
        market = check_name(str(node["market"]))
        if "data-path" not in node:
            raise ValueError(f"The node config names market '{market}' but gives no data-path.")
        if not config.catalog_path:
            raise ValueError("A deployed market needs the company catalog: set catalog-path in its node config.")
        catalog = _load_catalog(config.catalog_path)
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


# The markets' tensors this process built, bounded as fedals' markets are (common.runtime.sized_cache).
_tensors: SizedCache[MarketTensors] = SizedCache(4_000_000)


def _market_tensors(split: MarketSplit, history_length: int) -> MarketTensors:
    key = (split.market, history_length)
    tensors = _tensors.get(key)
    if tensors is None or tensors.split is not split:
        tensors = _tensors.put(key, MarketTensors.from_split(split, history_length), split.num_train)
    return tensors


def build_local_model(
    msg: Message, context: Context
) -> tuple[SplitRecommender, MarketTensors, RunConfig, list[str], Catalog]:
    """The market's model: received arrays over its head (saved, init-from's or freshly seeded); also its catalog.

    Raises
    ------
    ValueError
        If the received arrays are not the method's shared arrays, do not fit the
        model, or are not finite float arrays of the model's dtype; or the run
        trains a deployed market under DP without a ``state-dir``.
    """
    config = config_from_context(context)
    split, catalog = resolve_market(context, config)
    policy = region_policy(context, split.market)
    config = config.for_market(split.market, policy)
    require_durable_ledger(context, config, split.market)
    data = _market_tensors(split, config.history_length)
    if config.dp_epsilon > 0:
        # Under DP the rows a market moves are public, not the items its users bought.
        data = replace(data, released_rows=torch.as_tensor(public_assortment(policy, catalog)))
    torch.manual_seed(market_seed(split.market, config.seed))
    model = SplitRecommender(
        ModelConfig(catalog.size, split.num_users, config.embedding_dim, config.history_length, config.user_embeddings)
    )
    shared = shared_parameter_names(model, get_method(config.method).share_head)
    if LOCAL_STATE_KEY not in context.state:
        training_id = str(msg.content[CONFIG_RECORD].get(TRAINING_ID_KEY, ""))
        continues = str(msg.content[CONFIG_RECORD].get(CONTINUES_KEY, ""))
        _restore_saved_state(context, model, split.market, training_id, continues, private=config.dp_epsilon > 0)
    if LOCAL_STATE_KEY not in context.state:
        head = published_head(context, model, split, catalog, shared, private=config.dp_epsilon > 0)
        if head is not None:
            context.state[LOCAL_STATE_KEY] = ArrayRecord(head)
    if LOCAL_STATE_KEY in context.state:
        set_arrays(model, context.state[LOCAL_STATE_KEY].to_torch_state_dict())
    received = msg.content[ARRAYS_RECORD].to_torch_state_dict()
    check_received(model, received, shared, split.market)
    set_arrays(model, blend_with_own(received, context, config))
    return model, data, config, shared, catalog


def check_received(model: SplitRecommender, received: dict[str, torch.Tensor], shared: list[str], market: str) -> None:
    """Refuse arrays from the network that are not the shared arrays of this model, finite, of its dtype."""
    if set(received) != set(shared):
        raise ValueError(
            f"Market '{market}' expected the arrays {sorted(shared)} from the server "
            f"but received {sorted(received)}; do server and client use the same method?"
        )
    misfits = _misfits(model, received)
    if misfits:
        raise ValueError(
            f"Market '{market}': the server's arrays do not fit its model ({'; '.join(misfits)}); "
            "server and regions must use the same catalog (catalog-path) and embedding-dim."
        )
    expected = model.state_dict()
    wrong_dtype = sorted(name for name, value in received.items() if value.dtype != expected[name].dtype)
    if wrong_dtype:
        raise ValueError(
            f"Market '{market}': the server's arrays {wrong_dtype} are not {expected[wrong_dtype[0]].dtype}."
        )
    non_finite = sorted(name for name, value in received.items() if not torch.isfinite(value).all())
    if non_finite:
        raise ValueError(f"Market '{market}': the server's arrays {non_finite} hold NaN or infinite values.")


def blend_with_own(received: dict[str, torch.Tensor], context: Context, config: RunConfig) -> dict[str, torch.Tensor]:
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
    directory = state_dir(context)
    return MarketStateStore(directory, market) if directory else None


def _restore_saved_state(
    context: Context, model: SplitRecommender, market: str, training_id: str, continues: str, private: bool
) -> None:
    """Put a saved head (and own arrays) into a fresh ``context.state``, if one belongs here and fits the model.

    The head of this very training is restored (a restarted SuperNode rejoins). A new training
    starts from the market's head of the training it continues (``continues``, the training whose
    published part the server started from, or that a join of the region came from), and from a
    new head when it continues none: a new training is never warm-started by accident.

    Under DP (``private``) only a head trained under DP alone is restored:
    everything that shapes what a market sends must be trained with DP, and a
    head fitted without it (a non-private training, ``clients.join``) would
    leak into the encoder's gradients. The privacy ledger is not restored
    here: it lives apart and is read whatever happens to the head (see
    :mod:`clients.privacy_state`).
    """
    store = state_store(context, market)
    if store is None:
        return
    latest = store.load()
    if latest is not None and latest.training_id == training_id:
        saved = latest
    else:
        saved = store.load_training(continues, latest) if continues else None
    if saved is None:
        if latest is not None or continues:
            why = f"has no head of training {continues}" if continues else "continues no earlier training"
            log(INFO, "Market %s starts training %s with a new head: it %s.", market, training_id, why)
        return
    if private and not saved.private:
        log(
            WARNING,
            "Market %s: the head saved in %s was trained without DP; under DP it starts with a new head.",
            market,
            store.path,
        )
        return
    misfits = _misfits(model, saved.head)
    if misfits:
        log(
            WARNING,
            "Market %s: the head saved in %s does not fit this model (%s); starting with a new head.",
            market,
            store.path,
            ", ".join(misfits),
        )
        return
    context.state[LOCAL_STATE_KEY] = ArrayRecord(saved.head)
    if saved.own_arrays is not None and not _misfits(model, saved.own_arrays):
        context.state[OWN_ARRAYS_KEY] = ArrayRecord(saved.own_arrays)
    if saved.training_id == training_id:
        log(INFO, "Market %s rejoins training %s with its head from round %d.", market, training_id, saved.last_round)
    else:
        log(
            INFO,
            "Market %s starts training %s from the head it saved in training %s (round %d), which it continues.",
            market,
            training_id,
            saved.training_id,
            saved.last_round,
        )


def persist(context: Context, market: str, training_id: str, server_round: int, private: bool) -> None:
    """Save the head and own arrays of ``context.state`` to the market's state directory, if any.

    ``private`` says the round trained under DP; then the head was trained
    under DP alone (a DP training never starts from any other head).

    Raises
    ------
    ValueError
        If the head holds NaN or infinite values: such a head is never saved.
    """
    store = state_store(context, market)
    if store is None:
        return
    head = context.state[LOCAL_STATE_KEY].to_torch_state_dict()
    non_finite = sorted(name for name, value in head.items() if not torch.isfinite(value).all())
    if non_finite:
        raise ValueError(f"Market '{market}': its head {non_finite} holds NaN or infinite values; it is not saved.")
    own_arrays = context.state.get(OWN_ARRAYS_KEY)
    store.save(
        MarketState(
            training_id=training_id,
            last_round=server_round,
            head=head,
            own_arrays=own_arrays.to_torch_state_dict() if own_arrays is not None else None,
            private=private,
            # Once the market keeps a ledger, its state says so: a ledger lost later is noticed.
            ledger=LedgerStore(store.path.parent, market).exists(),
        )
    )
