"""What the server does per method family, chosen once from the run's method (:mod:`common.methods`).

A family is how its methods train and what crosses the wire: ``"sgd"`` (the neural split
recommender, its shared parameters averaged by Flower's FedAvg, optionally under market-level
DP) and ``"als"`` (fedals: item statistics in, item factors out, :mod:`server.fedals`). The
ServerApp looks up :data:`SERVER_FAMILIES` once and never tests a method's flags; a new family
is a new entry here and in :data:`clients.client_app.CLIENT_FAMILIES`.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from common.data.catalog import Catalog
from common.ials.model import initial_encoder_state
from common.methods import get_method
from common.neural.model import ModelConfig, SplitRecommender, get_arrays, shared_parameter_names
from common.run_config import RunConfig
from server.fedals import FedALS
from server.strategy import MarketDPConfig, build_strategy

ReplyCheck = Callable[[dict[str, np.ndarray]], str | None]  # what is wrong with a reply's arrays, or None


@dataclass(frozen=True)
class ServerFamily:
    """The server's pieces of one method family."""

    # The seeded starting point of everything the method shares, over the catalog.
    initial_arrays: Callable[[RunConfig, Catalog], ArrayRecord]
    # The Flower strategy that aggregates the markets' replies.
    strategy: Callable[[RunConfig, Catalog], Strategy]
    # The strategy's check of a reply's arrays before it is aggregated; None: the round loop's own checks only.
    reply_check: Callable[[Strategy], ReplyCheck | None]


def market_dp(config: RunConfig) -> MarketDPConfig | None:
    """The market-level DP settings, or None when it is off."""
    if config.market_dp_noise_multiplier == 0:
        return None
    return MarketDPConfig(
        noise_multiplier=config.market_dp_noise_multiplier,
        clipping_norm=config.market_dp_clipping_norm,
        num_markets=config.market_dp_markets,
        delta=config.market_dp_delta,
        max_epsilon=config.market_dp_max_epsilon,
    )


def _sgd_arrays(config: RunConfig, catalog: Catalog) -> ArrayRecord:
    """The seeded model's shared parameters (the head's user table is never shared: one placeholder user)."""
    torch.manual_seed(config.seed)
    model = SplitRecommender(
        ModelConfig(catalog.size, 1, config.embedding_dim, config.history_length, config.user_embeddings)
    )
    return ArrayRecord(get_arrays(model, shared_parameter_names(model, get_method(config.method).share_head)))


def _als_arrays(config: RunConfig, catalog: Catalog) -> ArrayRecord:
    """The encoder holding fedals' seeded item factors, which markets draw for their own rows in round 1."""
    return ArrayRecord(initial_encoder_state(catalog.size, config.ials_config()))


def _als_strategy(config: RunConfig, catalog: Catalog) -> FedALS:
    return FedALS(
        config.ials_config(),
        catalog.size,
        seeded_start=not config.init_from,
        min_nodes=config.min_nodes,
        private=config.dp_epsilon > 0,
    )


SERVER_FAMILIES: dict[str, ServerFamily] = {
    "sgd": ServerFamily(
        initial_arrays=_sgd_arrays,
        strategy=lambda config, catalog: build_strategy(
            config.min_nodes, market_dp(config), config.aggregation, config.aggregation_malicious
        ),
        reply_check=lambda strategy: None,
    ),
    "als": ServerFamily(
        initial_arrays=_als_arrays,
        strategy=_als_strategy,
        reply_check=lambda strategy: strategy.reply_problem,
    ),
}


def server_family(config: RunConfig) -> ServerFamily:
    """The server's pieces for the run's method."""
    return SERVER_FAMILIES[get_method(config.method).family]
