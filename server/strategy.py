"""The aggregation strategy: Flower's FedAvg or one of its robust rules, optionally with market-level DP.

FedAvg weighs each market by the count it reports; ``aggregation`` (the run config) chooses
instead Flower's FedMedian, FedTrimmedAvg, Krum or MultiKrum, which ignore the claimed weights,
so that one market can neither claim the whole average nor pull it arbitrarily far.

Market-level DP wraps FedAvg in Flower's ``DifferentialPrivacyServerSideFixedClipping``:
each market's update of the shared arrays is clipped to an L2 norm, the
average gets Gaussian noise, and Flower's RDP accountant composes one release
per round. It protects whole markets (any one market's participation), not
individual users, and its accountant requires every market to weigh the same
in the average and exactly ``num-markets`` of them to reply each round.
"""

from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO
from typing import Any

from flwr.common import log
from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)

from common.protocol import ARRAYS_RECORD, CONFIG_RECORD, NUM_EXAMPLES_KEY, TRAINED_KEY


@dataclass(frozen=True)
class MarketDPConfig:
    """Market-level DP on the server: clip each market's update, noise the average."""

    noise_multiplier: float  # Gaussian noise std in units of the clipping norm
    clipping_norm: float  # L2 bound on one market's update of the shared arrays
    num_markets: int  # markets per round; every one must reply for a round to count
    delta: float  # the delta at which epsilon is reported
    max_epsilon: float  # 0 for no limit; otherwise a round that would exceed it is refused

    def __post_init__(self) -> None:
        if self.noise_multiplier <= 0:
            raise ValueError(f"Market-level DP needs a positive noise multiplier, got {self.noise_multiplier}.")
        if self.clipping_norm <= 0:
            raise ValueError(f"Market-level DP needs a positive clipping norm, got {self.clipping_norm}.")
        if self.num_markets < 1:
            raise ValueError(f"Market-level DP needs at least one market per round, got {self.num_markets}.")
        if not 0 < self.delta < 1:
            raise ValueError(f"The market-level delta must lie strictly between 0 and 1, got {self.delta}.")
        if self.max_epsilon < 0:
            raise ValueError(f"The market-level epsilon budget must not be negative, got {self.max_epsilon}.")


# How each name of common.run_config.AGGREGATIONS combines the markets' updates: Flower's
# strategy, and its options from (aggregation-malicious f, markets per round n). The robust
# ones ignore the weights the markets claim.
AGGREGATION_STRATEGIES: dict[str, tuple[type[FedAvg], Callable[[int, int], dict[str, Any]]]] = {
    "fedavg": (FedAvg, lambda f, n: {}),
    "fedmedian": (FedMedian, lambda f, n: {}),
    "fedtrimmedavg": (FedTrimmedAvg, lambda f, n: {"beta": 0.2}),
    "krum": (Krum, lambda f, n: {"num_malicious_nodes": f}),
    "multikrum": (MultiKrum, lambda f, n: {"num_malicious_nodes": f, "num_nodes_to_select": max(1, n - f)}),
}


def build_strategy(
    min_nodes: int, market_dp: MarketDPConfig | None, aggregation: str = "fedavg", malicious: int = 1
) -> Strategy:
    """The aggregation over all connected markets, wrapped in market-level DP when configured.

    Parameters
    ----------
    min_nodes : int
        Markets that must be connected before a round starts.
    market_dp : MarketDPConfig or None
        Market-level DP settings (FedAvg only), or None.
    aggregation : str, default "fedavg"
        A key of :data:`AGGREGATION_STRATEGIES`: FedAvg weighted by ``num-examples``, or one of
        Flower's robust rules.
    malicious : int, default 1
        Krum and MultiKrum: the markets assumed hostile.
    """
    if aggregation not in AGGREGATION_STRATEGIES:
        raise ValueError(f"Unknown aggregation '{aggregation}'; choose one of {', '.join(AGGREGATION_STRATEGIES)}.")
    if market_dp is not None and aggregation != "fedavg":
        raise ValueError("Market-level DP aggregates with fedavg only: its accountant assumes an equal-weight mean.")
    if market_dp is None:
        kind, options = AGGREGATION_STRATEGIES[aggregation]
        return kind(
            # A robust rule weighs every market that trained alike (MultiKrum averages its chosen
            # updates by this key): "trained" is 0 or 1 (server.replies), never a market's claim of size.
            weighted_by_key=NUM_EXAMPLES_KEY if kind is FedAvg else TRAINED_KEY,
            arrayrecord_key=ARRAYS_RECORD,
            configrecord_key=CONFIG_RECORD,
            min_train_nodes=min_nodes,
            min_evaluate_nodes=min_nodes,
            min_available_nodes=min_nodes,
            **options(malicious, min_nodes),
        )
    # TRAINED_KEY weighs every market that trained alike, as the accountant requires.
    nodes = max(min_nodes, market_dp.num_markets)
    fedavg = FedAvg(
        weighted_by_key=TRAINED_KEY,
        arrayrecord_key=ARRAYS_RECORD,
        configrecord_key=CONFIG_RECORD,
        min_train_nodes=nodes,
        min_evaluate_nodes=nodes,
        min_available_nodes=nodes,
    )
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=market_dp.delta,
            population_size=market_dp.num_markets,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
            max_epsilon=market_dp.max_epsilon or None,
        )
    )
    log(
        INFO,
        "Market-level DP: clipping norm %s, noise multiplier %s, %d markets per round",
        market_dp.clipping_norm,
        market_dp.noise_multiplier,
        market_dp.num_markets,
    )
    return DifferentialPrivacyServerSideFixedClipping(
        fedavg,
        noise_multiplier=market_dp.noise_multiplier,
        clipping_norm=market_dp.clipping_norm,
        num_sampled_clients=market_dp.num_markets,
        accountant=accountant,
    )


def market_dp_epsilon(strategy: Strategy) -> float | None:
    """The market-level epsilon spent so far, or None without market-level DP."""
    if not isinstance(strategy, DifferentialPrivacyServerSideFixedClipping) or strategy.accountant is None:
        return None
    return strategy.privacy_spent().epsilon


def _fedavg(strategy: Strategy) -> FedAvg | None:
    """The FedAvg inside ``strategy`` (itself, or the one a DP wrapper wraps)."""
    while not isinstance(strategy, FedAvg) and hasattr(strategy, "strategy"):
        strategy = strategy.strategy
    return strategy if isinstance(strategy, FedAvg) else None


def aggregation_weight_key(strategy: Strategy) -> str:
    """The metric the strategy weights the average by: ``num-examples``, or ``trained`` under market-level DP."""
    fedavg = _fedavg(strategy)
    return fedavg.weighted_by_key if fedavg is not None else NUM_EXAMPLES_KEY


def required_nodes(strategy: Strategy) -> int:
    """How many connected nodes the strategy waits for before it configures a round."""
    fedavg = _fedavg(strategy)
    if fedavg is None:
        return 1
    return max(fedavg.min_available_nodes, fedavg.min_train_nodes, fedavg.min_evaluate_nodes)
