"""ServerApp: FedAvg over the shared encoder, per-market metrics, checkpoints, resume, the published shared part.

A training starts from seeded shared arrays, or with ``init-from`` from the
shared part an earlier training published (``published.pt``, or a directory
holding one): a region whose data grew continues from it. A checkpoint to
resume from wins over both. ``fedals`` (federated implicit ALS) runs the same
loop with its own strategy (:mod:`server.fedals`), its shared arrays the
encoder's item table of iALS factors.
"""

from dataclasses import asdict, dataclass
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from common.config import from_kebab_case
from common.data.catalog import Catalog
from common.data.markets import MarketSource
from common.ials.core import IALSConfig
from common.ials.model import initial_encoder_state
from common.market_config import MarketConfig, check_als_settings, ials_config, parse_market_epsilons
from common.methods import get_method
from common.neural.model import ModelConfig, SplitRecommender, get_arrays, shared_parameter_names
from common.serving.published import load_published, published_path
from server.fedals import FedALS
from server.history import CHECKPOINT_FILE, PUBLISHED_FILE, RunHistory, check_new_training, summary_lines
from server.replies import MarketBinding
from server.resume import check_resumable, run_fingerprint
from server.rounds import RoundSettings, restore_strategy_state, run_rounds
from server.strategy import MarketDPConfig, build_strategy

FINAL_ROUND_KEY = "final-round"  # evaluate config of the last round: each market writes its served model


@dataclass(frozen=True)
class ServerConfig:
    """Run settings of the ServerApp, read from ``[tool.flwr.app.config]``."""

    method: str  # fedavg shares the head's non-user parameters too; fedper only the encoder
    num_server_rounds: int  # federated rounds
    local_epochs: int  # passes over its data a market makes per round
    head_epochs: int  # fedrep: epochs on the head (encoder frozen) before the encoder epochs
    fine_tune_epochs: int  # fedper-ft: epochs each market may fine-tune its fork after the last round
    batch_size: int  # interactions per local step
    learning_rate: float  # local Adam step size
    negatives: int  # sampled negatives per positive in the local loss
    score_penalty: float  # local regulariser on squared scores
    embedding_dim: int  # width of the shared item vectors
    history_length: int  # training items pooled into a user's vector
    user_embeddings: bool  # a free vector per user; always local, so only the shape matters here
    data_dir: str  # simulation: market files; empty for generated markets
    synthetic_markets: int  # generated markets when data-dir is empty
    catalog_path: str  # the company catalog; simulation builds one when empty
    seed: int  # seeds the initial encoder (and, in clients, everything local)
    min_nodes: int  # markets that must be connected before a round starts
    round_timeout: float  # seconds to wait for replies; a market that died is left out of the round
    node_timeout: float  # seconds a round waits for min-nodes markets to connect; then the run fails
    poll_interval: float  # seconds between checks for replies (Flower's own loop waits 3 s)
    fold_evaluation: bool  # evaluate each round's model in the next training message: one round trip per round
    resume: bool  # continue from out-dir's checkpoint instead of starting afresh
    init_from: str  # a published.pt (or a directory holding one) to start from; empty: seeded arrays
    market_dp_noise_multiplier: float  # 0 turns market-level DP off; else noise std over the clipping norm
    market_dp_clipping_norm: float  # L2 bound on one market's update of the shared arrays
    market_dp_markets: int  # markets per round under market-level DP (all must reply)
    market_dp_delta: float  # delta at which the market-level epsilon is reported
    market_dp_max_epsilon: float  # 0 for no limit; rounds beyond it are refused
    als_factors: int  # fedals: dimension d of the item factors, the width of its shared item table
    als_regularization: float  # fedals: λ of the item step
    als_alpha: float  # fedals: α, a positive's confidence is 1 + α·w
    als_nu: float  # fedals: ν of the frequency-scaled regularisation
    als_confidence: str  # fedals: how markets weigh a positive (binary, rating, log)
    out_dir: str  # history.json and checkpoint.pt go here

    def __post_init__(self) -> None:
        check_als_settings(self.als_factors, self.als_regularization, self.als_alpha, self.als_nu, self.als_confidence)
        if self.solved_by_als and self.market_dp_noise_multiplier != 0:
            raise ValueError(
                f"{self.method} has no market-level DP: set market-dp-noise-multiplier to 0 (got "
                f"{self.market_dp_noise_multiplier}) and dp-epsilon for its user-level DP, or choose an SGD method "
                "(fedavg, fedper, fedrep, fedper-ft) for market-level DP."
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

    @property
    def solved_by_als(self) -> bool:
        """The method is solved by ALS (fedals), not trained by SGD."""
        return get_method(self.method).solver == "als"

    @property
    def shared_dim(self) -> int:
        """Width of the shared item table: als-factors for fedals, embedding-dim otherwise."""
        return self.als_factors if self.solved_by_als else self.embedding_dim

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

    def market_dp(self) -> MarketDPConfig | None:
        """The market-level DP settings, or None when it is off."""
        if self.market_dp_noise_multiplier == 0:
            return None
        return MarketDPConfig(
            noise_multiplier=self.market_dp_noise_multiplier,
            clipping_norm=self.market_dp_clipping_norm,
            num_markets=self.market_dp_markets,
            delta=self.market_dp_delta,
            max_epsilon=self.market_dp_max_epsilon,
        )

    @classmethod
    def from_run_config(cls, run_config: dict) -> "ServerConfig":
        """Map the kebab-case run config keys onto the dataclass fields."""
        return from_kebab_case(cls, run_config, "ServerApp")

    def train_config(self) -> ConfigRecord:
        """Per-round local training settings sent to every market."""
        return ConfigRecord(
            {
                "local-epochs": self.local_epochs,
                "head-epochs": self.head_epochs,
                "batch-size": self.batch_size,
                "learning-rate": self.learning_rate,
                "negatives": self.negatives,
                "score-penalty": self.score_penalty,
            }
        )


def final_evaluate_config(config: ServerConfig) -> ConfigRecord:
    """Extra evaluate settings of the last round: the markets write their served models; fedper-ft fine-tunes."""
    if not get_method(config.method).fine_tune:
        return ConfigRecord({FINAL_ROUND_KEY: True})
    final = config.train_config()
    final["fine-tune-epochs"] = config.fine_tune_epochs
    final[FINAL_ROUND_KEY] = True
    return final


def load_catalog(config: ServerConfig) -> Catalog:
    """The company catalog; in simulation without one, the catalog of every market's items."""
    if config.catalog_path:
        return Catalog.load(config.catalog_path)
    return MarketSource(config.data_dir, config.synthetic_markets, config.seed).catalog()


def initial_arrays(config: ServerConfig, catalog: Catalog | None = None) -> ArrayRecord:
    """The seeded starting point of everything the method shares (over ``catalog``, loaded when None).

    fedals shares the encoder holding its seeded initial item factors, which markets draw
    for their own rows in round 1 (:func:`common.ials_model.initial_rows`).
    """
    catalog = catalog if catalog is not None else load_catalog(config)
    if config.solved_by_als:
        return ArrayRecord(initial_encoder_state(catalog.size, config.ials_config()))
    torch.manual_seed(config.seed)
    # The head's user table is never shared, so one placeholder user suffices here.
    model = SplitRecommender(
        ModelConfig(catalog.size, 1, config.embedding_dim, config.history_length, config.user_embeddings)
    )
    names = shared_parameter_names(model, get_method(config.method).share_head)
    return ArrayRecord(get_arrays(model, names))


def published_arrays(config: ServerConfig, catalog: Catalog, seeded: ArrayRecord) -> ArrayRecord:
    """The shared arrays of the published file ``init-from`` names, where this training starts.

    Parameters
    ----------
    config : ServerConfig
        The run's settings; ``init_from`` names a ``published.pt`` or a directory holding one.
    catalog : Catalog
        The run's catalog.
    seeded : ArrayRecord
        :func:`initial_arrays` of the run: the names, shapes and dtypes the published arrays must have.

    Raises
    ------
    ValueError
        If the file cannot be read, or its training shared other arrays than
        this run does: another kind of method (fedavg shares the head's
        non-user arrays too), embedding-dim, history-length, user-embeddings
        or catalog. Every mismatch is named with both values.
    """
    published = load_published(published_path(config.init_from))
    differences = []
    if get_method(published.method).share_head != get_method(config.method).share_head:
        differences.append(f"method: {published.method} shares other arrays than {config.method} of this run")
    for key, theirs, ours in (
        ("embedding-dim", published.embedding_dim, config.shared_dim),
        ("history-length", published.history_length, config.history_length),
        ("user-embeddings", published.user_embeddings, config.user_embeddings),
        ("catalog fingerprint", published.catalog_fingerprint, catalog.fingerprint()),
    ):
        if theirs != ours:
            differences.append(f"{key}: {theirs!r} there, {ours!r} in this run")
    if not differences:
        described = {name: (tuple(a.shape), a.dtype) for name, a in published.arrays.items()}
        wanted = {name: (tuple(a.shape), a.dtype) for name, a in seeded.to_torch_state_dict().items()}
        differ = sorted(name for name in described.keys() | wanted.keys() if described.get(name) != wanted.get(name))
        if differ:
            differences.append(f"arrays: {differ} have other names, shapes or dtypes than this run's")
    if differences:
        raise ValueError(
            f"Cannot start from {published.path} (init-from): training {published.training_id} shared other arrays "
            f"than this run does ({'; '.join(differences)}). Run with the settings it was trained with, or leave "
            "init-from empty."
        )
    log(
        INFO,
        "Starting from the shared arrays training %s published after round %d (%s)",
        published.training_id,
        published.round,
        published.path,
    )
    return ArrayRecord(published.arrays)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured rounds of FedAvg, from a checkpoint when resuming."""
    config = ServerConfig.from_run_config(context.run_config)
    # A bad market setting would otherwise only show as every market failing round 1.
    market_config = MarketConfig.from_run_config(context.run_config)
    if not config.resume:
        check_new_training(Path(config.out_dir))  # never overwrite an earlier training's files
    log(INFO, "Federated %s for %d rounds, writing to %s", config.method, config.num_server_rounds, config.out_dir)
    history = RunHistory(Path(config.out_dir), asdict(config))
    catalog = load_catalog(config)
    if config.solved_by_als:
        strategy = FedALS(
            config.ials_config(),
            catalog.size,
            seeded_start=not config.init_from,
            min_nodes=config.min_nodes,
            private=market_config.dp_epsilon > 0,
        )
    else:
        strategy = build_strategy(config.min_nodes, config.market_dp())
    fingerprint = run_fingerprint(context.run_config, catalog)
    arrays, first_round, training_id = initial_arrays(config, catalog), 1, str(context.run_id)
    binding = MarketBinding()
    checkpoint = history.load_checkpoint() if config.resume else None
    if checkpoint is not None:
        # The checkpoint wins over init-from: its arrays already descend from wherever the training started.
        where = str(Path(config.out_dir) / CHECKPOINT_FILE)
        check_resumable(checkpoint.fingerprint, fingerprint, where)
        check_same_arrays(checkpoint.arrays, arrays, where)
        arrays = ArrayRecord(checkpoint.arrays)
        first_round, training_id = checkpoint.server_round + 1, checkpoint.training_id
        restore_strategy_state(strategy, checkpoint.strategy_state)
        # The binding survives the resume: a registered SuperNode keeps its node id.
        binding = MarketBinding(checkpoint.markets)
    else:
        if config.resume:
            log(INFO, "Nothing to resume in %s: starting afresh", config.out_dir)
        if config.init_from:
            arrays = published_arrays(config, catalog, arrays)
    if first_round > config.num_server_rounds:
        log(INFO, "All %d rounds were completed before; nothing to resume", config.num_server_rounds)
        # Publishing again costs nothing and covers a server stopped between the last checkpoint and publishing.
        publish(history, arrays, config, catalog, training_id, first_round - 1, context.run_config)
        log_summary(history, config, binding, context.run_config)
        return
    settings = RoundSettings(
        num_rounds=config.num_server_rounds,
        timeout=config.round_timeout,
        poll_interval=config.poll_interval,
        fold_evaluation=config.fold_evaluation,
        training_id=training_id,
        node_timeout=config.node_timeout,
        fingerprint=fingerprint,
        budgeted_markets=frozenset(parse_market_epsilons(market_config.dp_market_epsilons)),
    )
    final = final_evaluate_config(config)
    arrays_problem = strategy.reply_problem if isinstance(strategy, FedALS) else None
    arrays = run_rounds(
        grid, strategy, history, settings, arrays, config.train_config(), final, first_round, binding, arrays_problem
    )
    publish(history, arrays, config, catalog, training_id, config.num_server_rounds, context.run_config)
    log_summary(history, config, binding, context.run_config)


def log_summary(history: RunHistory, config: ServerConfig, binding: MarketBinding, run_config: dict[str, Any]) -> None:
    """The training's last lines: rounds, who replied, the best round, where its files and models are."""
    for line in summary_lines(history, config.num_server_rounds, binding.state().values()):
        log(INFO, "%s", line)
    models_dir = str(run_config.get("models-dir", ""))
    served = Path(models_dir) / config.method / "<market>" if models_dir else "<state-dir>/model in each region"
    log(INFO, "  served models (each market's best round by its own validation): %s", served)


def publish(
    history: RunHistory,
    arrays: ArrayRecord,
    config: ServerConfig,
    catalog: Catalog,
    training_id: str,
    server_round: int,
    run_config: dict[str, Any],
) -> None:
    """Publish ``arrays``, the shared arrays after ``server_round``, the last round, for markets that join later.

    In ``out-dir``; in simulation also as ``<models-dir>/<method>/published.pt``,
    beside the markets' served models (see :mod:`clients.join`).
    """
    models_dir = str(run_config.get("models-dir", ""))
    about = {
        "method": config.method,
        "embedding-dim": config.shared_dim,
        "history-length": config.history_length,
        "user-embeddings": config.user_embeddings,
        "catalog-fingerprint": catalog.fingerprint(),
        "training-id": training_id,
        "round": server_round,
    }
    copies = [Path(models_dir) / config.method / PUBLISHED_FILE] if models_dir else []
    history.publish(arrays, about, copies)


def check_same_arrays(saved: dict[str, torch.Tensor], arrays: ArrayRecord, checkpoint: str) -> None:
    """Refuse a checkpoint whose arrays differ in names, shapes or dtypes from what this run shares."""
    expected = arrays.to_torch_state_dict()
    described = {name: (tuple(t.shape), str(t.dtype)) for name, t in saved.items()}
    wanted = {name: (tuple(t.shape), str(t.dtype)) for name, t in expected.items()}
    if described != wanted:
        differ = sorted(name for name in described.keys() | wanted.keys() if described.get(name) != wanted.get(name))
        raise ValueError(
            f"Cannot resume from {checkpoint}: its arrays differ from what this run shares in {differ} "
            f"(checkpoint: {[described.get(n) for n in differ]}, this run: {[wanted.get(n) for n in differ]}); "
            "resume with the run config it was made with."
        )
