"""The run config as one model: every key of the app config in pyproject.toml, parsed once by its type.

Whoever submits a run writes it; the ServerApp, every market and the simulation harness read
the same :class:`RunConfig` (``RunConfig.from_run_config``), so a key has one field, one comment
and one check, and a bad setting is refused by its key before any market trains. What a side
uses is its view: the server the rounds, timeouts and market-level DP; a market the model, the
local training and its DP budget (:meth:`RunConfig.for_market` applies its region's ceilings).
Nothing here can weaken a region's protection: those settings come from its node config
(:mod:`common.privacy.region`).
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from common.config import from_kebab_case
from common.ials.core import CONFIDENCES, IALSConfig
from common.ials.wire import WIRE_DTYPES
from common.methods import get_method
from common.privacy.ledger import ACCOUNTANTS
from common.privacy.region import RegionPolicy
from common.protocol import (
    BATCH_SIZE_KEY,
    HEAD_EPOCHS_KEY,
    LEARNING_RATE_KEY,
    LOCAL_EPOCHS_KEY,
    NEGATIVES_KEY,
    SCORE_PENALTY_KEY,
)

# The server's ways of combining SGD updates (server.strategy maps each to Flower's strategy).
AGGREGATIONS = ("fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum")


@dataclass(frozen=True)
class RunConfig:
    """Every run setting, by the kebab-case key's snake-case name (``dp-epsilon``: ``dp_epsilon``)."""

    method: str  # federated method (common.methods): its family and which parameters are shared
    num_server_rounds: int  # federated rounds; also the length over which a DP budget is spread
    local_epochs: int  # passes over its data a market makes per round
    head_epochs: int  # fedrep: epochs on the head (encoder frozen) before the encoder epochs
    batch_size: int  # interactions per local step
    learning_rate: float  # local Adam step size
    negatives: int  # sampled negatives per positive in the local loss
    score_penalty: float  # local regulariser on squared scores
    embedding_dim: int  # must match the server's encoder
    history_length: int  # training items pooled into a user's vector
    user_embeddings: bool  # a free vector per user besides the pooled history
    data_dir: str  # simulation: directory of market files, empty for synthetic
    synthetic_markets: int  # simulation without data-dir: markets to generate
    catalog_path: str  # the company catalog; simulation builds one when empty
    seed: int  # seeds splits, negatives, initial heads and local shuffling
    fine_tune_epochs: int  # fedper-ft: the fork's epochs, part of the DP budget
    dp_epsilon: float  # 0 trains without DP; otherwise the most a market's lifetime spending may reach in this run
    dp_market_epsilons: str  # "de=4,jp=2": named markets' own budgets in place of dp-epsilon
    dp_delta: float  # 0: the region's (node config), else the ledger's, else 0.1 / the released user count
    dp_max_grad_norm: float  # per-example clipping bound of DP-SGD
    dp_batch_size: int  # expected users per DP-SGD step (Poisson): the noise on a step is sigma * clip / batch
    dp_learning_rate: float  # Adam step size under DP: fewer, less noisy steps than without DP
    dp_user_positives: int  # training items of a sampled user per DP-SGD step (one user is one example)
    dp_popularity_share: float  # share of the budget the released item popularity alone would spend; 0 releases none
    dp_accountant: str  # prv (tightest) or rdp
    global_weight: float  # share of the received arrays in a market's model; the rest is its own last trained copy
    dp_global_weight: float  # the same under DP, where the others' updates carry their noise
    als_factors: int  # fedals: dimension d of the user and item factors
    als_regularization: float  # fedals: λ, the L2 weight on every factor
    als_alpha: float  # fedals: α, a positive's confidence is 1 + α·w
    als_nu: float  # fedals: ν, frequency-scaled regularisation λ·(count + rows/α)^ν; 0 is plain iALS
    als_confidence: str  # fedals: w from the rating, binary (1), rating (r) or log (log(1 + r))
    # fedals: float type of the statistics a market sends: float16 halves them (within 2x fedper's
    # upload at d=128), float32 makes fedals equal pooled iALS to 1e-5 (docs/fedals.md)
    als_wire: str
    min_nodes: int  # markets that must be connected before a round starts
    round_timeout: float  # seconds to wait for replies; a market that died is left out of the round
    node_timeout: float  # seconds a round waits for min-nodes markets to connect; then the run fails
    poll_interval: float  # seconds between checks for replies (Flower's own loop waits 3 s)
    fold_evaluation: bool  # evaluate each round's model in the next training message: one round trip per round
    # fedals: after the training, train again from the start for its best validation round's number of rounds on
    # every interaction (validation and test too) and serve that refit; its test metrics cannot be measured
    serve_refit: bool
    resume: bool  # continue from out-dir's checkpoint instead of starting afresh
    init_from: str  # a published.pt (or a directory holding one) to start from; empty: seeded arrays
    market_dp_noise_multiplier: float  # server-side market-level DP: 0 is off; else noise std over the clipping norm
    market_dp_clipping_norm: float  # L2 bound on one market's update of the shared arrays
    market_dp_markets: int  # markets per round under market-level DP (all must reply)
    market_dp_delta: float  # delta at which the market-level epsilon is reported
    market_dp_max_epsilon: float  # 0 for no limit; rounds beyond it are refused
    aggregation: str  # SGD methods: fedavg (weighted by claimed counts) or a robust rule of Flower's (AGGREGATIONS)
    aggregation_malicious: int  # krum, multikrum: markets assumed hostile
    out_dir: str  # the server's history.json, checkpoint.pt and published.pt go here
    models_dir: str  # simulation only: markets write served models to <models-dir>/<method>/<market>

    def __post_init__(self) -> None:
        method = get_method(self.method)  # a ValueError naming the methods if unknown
        if method.proximal_mu and (self.dp_epsilon > 0 or self.dp_market_epsilons.strip()):
            raise ValueError(
                f"{self.method} adds a proximal term to plain training only (under DP-SGD it would be clipped with "
                "each user's gradient): set dp-epsilon to 0 and dp-market-epsilons empty, or choose fedavg."
            )
        if self.solved_by_als and self.market_dp_noise_multiplier != 0:
            raise ValueError(
                f"{self.method} has no market-level DP: set market-dp-noise-multiplier to 0 (got "
                f"{self.market_dp_noise_multiplier}) and dp-epsilon for its user-level DP, or choose an SGD method "
                "(fedavg, fedprox, fedper, fedrep, fedper-ft) for market-level DP."
            )
        if self.num_server_rounds < 1:
            raise ValueError(f"num-server-rounds must be at least 1, got {self.num_server_rounds}.")
        if self.min_nodes < 1:
            raise ValueError(f"min-nodes must be at least 1, got {self.min_nodes}.")
        if self.round_timeout <= 0 or self.poll_interval <= 0:
            raise ValueError(
                f"round-timeout and poll-interval must be positive, got {self.round_timeout} and {self.poll_interval}."
            )
        if not 0 < self.node_timeout < float("inf"):
            raise ValueError(f"node-timeout must be a positive number of seconds, got {self.node_timeout}.")
        check_als_settings(self.als_factors, self.als_regularization, self.als_alpha, self.als_nu, self.als_confidence)
        if self.als_wire not in WIRE_DTYPES:
            raise ValueError(f"als-wire must be one of {', '.join(WIRE_DTYPES)}, got '{self.als_wire}'.")
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
        for key, value in (
            ("dp-max-grad-norm", self.dp_max_grad_norm),
            ("dp-learning-rate", self.dp_learning_rate),
            ("dp-batch-size", self.dp_batch_size),
            ("dp-user-positives", self.dp_user_positives),
        ):
            if not value > 0:
                raise ValueError(f"{key} must be positive, got {value}.")
        if not 0 <= self.dp_popularity_share < 1:
            raise ValueError(
                f"dp-popularity-share must lie in [0, 1): what the release leaves pays for DP-SGD, "
                f"got {self.dp_popularity_share}."
            )
        if self.dp_accountant not in ACCOUNTANTS:
            raise ValueError(f"Unknown dp-accountant '{self.dp_accountant}'; choose one of {ACCOUNTANTS}.")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"Unknown aggregation '{self.aggregation}'; choose one of {', '.join(AGGREGATIONS)}.")
        # fedals sums statistics and ignores the aggregation, which is the SGD methods' own.
        if self.aggregation != "fedavg" and not self.solved_by_als:
            if self.market_dp_noise_multiplier != 0:
                raise ValueError(
                    f"aggregation '{self.aggregation}' cannot run under market-level DP, whose accountant "
                    "assumes fedavg's equal-weight mean; set aggregation to fedavg."
                )
            if self.aggregation_malicious < 0:
                raise ValueError(f"aggregation-malicious must not be negative, got {self.aggregation_malicious}.")
            needed = {"fedtrimmedavg": 5, "krum": 2 * self.aggregation_malicious + 3}
            needed["multikrum"] = needed["krum"]
            if self.min_nodes < needed.get(self.aggregation, 1):
                # FedTrimmedAvg cuts int(0.2·n) per side (nothing below 5 markets); Krum needs n ≥ 2f + 3.
                raise ValueError(
                    f"aggregation '{self.aggregation}' needs at least {needed[self.aggregation]} markets per round "
                    f"(min-nodes, got {self.min_nodes}) to leave a hostile market out; lower "
                    "aggregation-malicious or choose fedmedian."
                )

    @property
    def solved_by_als(self) -> bool:
        """The method is of the als family (fedals), not trained by SGD."""
        return get_method(self.method).family == "als"

    @property
    def shared_dim(self) -> int:
        """Width of the shared item table: als-factors for fedals, embedding-dim otherwise."""
        return self.als_factors if self.solved_by_als else self.embedding_dim

    def train_settings(self) -> dict[str, int | float]:
        """The per-round local training settings the server sends every market (common.protocol)."""
        return {
            LOCAL_EPOCHS_KEY: self.local_epochs,
            HEAD_EPOCHS_KEY: self.head_epochs,
            BATCH_SIZE_KEY: self.batch_size,
            LEARNING_RATE_KEY: self.learning_rate,
            NEGATIVES_KEY: self.negatives,
            SCORE_PENALTY_KEY: self.score_penalty,
        }

    def ials_config(self) -> IALSConfig:
        """fedals' iALS settings: one iteration per round, initial factors seeded by ``seed``."""
        return ials_config(
            self.als_factors,
            self.als_regularization,
            self.als_alpha,
            self.als_nu,
            self.als_confidence,
            self.num_server_rounds,
            self.seed,
        )

    def starting_weight(self) -> float:
        """The received arrays' share in the market's model: dp-global-weight under DP."""
        return self.dp_global_weight if self.dp_epsilon > 0 else self.global_weight

    def for_market(self, market: str, policy: RegionPolicy) -> "RunConfig":
        """The config with ``market``'s own budget as ``dp_epsilon``.

        Parameters
        ----------
        market : str
            The market's name; its ``dp-market-epsilons`` entry, if any, replaces ``dp-epsilon``.
        policy : RegionPolicy
            The region's own settings: its ``dp-epsilon``, if set, caps every run's budget
            (lowered to it, never raised). ``dp_delta`` stays the run's: the δ a market
            accounts at is the lowest of the run's (or the default), the region's and its
            budget period's (:func:`clients.privacy_state.period_delta`).

        Raises
        ------
        ValueError
            If the run trains the market without DP although its region demands DP.
        """
        epsilon = parse_market_epsilons(self.dp_market_epsilons).get(market, self.dp_epsilon)
        if epsilon == 0:
            if policy.demands_dp:
                raise ValueError(
                    f"Market '{market}' trains only under DP ({policy.demanded()} in its node config), "
                    "but this run trains without DP: set dp-epsilon in the run config."
                )
            return self
        return replace(self, dp_epsilon=min(epsilon, policy.epsilon_ceiling))

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "RunConfig":
        """Parse every key of ``run_config`` by its type (:func:`common.config.from_kebab_case`).

        Raises
        ------
        KeyError
            If a key is missing, naming it.
        ValueError
            On a value of the wrong type or out of range, naming the key.
        """
        return from_kebab_case(cls, run_config, "run")


def check_als_settings(factors: int, regularization: float, alpha: float, nu: float, confidence: str) -> None:
    """Refuse a bad ``als-*`` setting by its key (the ServerApp and every market read them).

    Raises
    ------
    ValueError
        Naming the key, what it must be and the value it has.
    """
    if factors < 1:
        raise ValueError(f"als-factors must be a positive whole number, got {factors}.")
    for key, value in (("als-regularization", regularization), ("als-alpha", alpha)):
        if not value > 0:
            raise ValueError(f"{key} must be a positive number, got {value}.")
    if not nu >= 0:
        raise ValueError(f"als-nu must be 0 (plain iALS) or a positive exponent, got {nu}.")
    if confidence not in CONFIDENCES:
        raise ValueError(f"als-confidence must be one of {', '.join(CONFIDENCES)}, got '{confidence}'.")


def ials_config(
    factors: int, regularization: float, alpha: float, nu: float, confidence: str, iterations: int, seed: int
) -> IALSConfig:
    """The :class:`common.ials.IALSConfig` of the ``als-*`` settings, ``iterations`` rounds and ``seed``."""
    check_als_settings(factors, regularization, alpha, nu, confidence)
    return IALSConfig(
        factors=factors,
        regularization=regularization,
        alpha=alpha,
        nu=nu,
        iterations=iterations,
        confidence=confidence,
        seed=seed,
    )


def _number(text: object) -> float:
    """``text`` as a float, NaN (which fails every range check) if it is not a number."""
    try:
        return float(text)
    except ValueError:
        return math.nan


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
