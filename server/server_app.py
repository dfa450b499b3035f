"""ServerApp: FedAvg over the shared encoder, per-market metrics, checkpoints."""

from dataclasses import asdict, dataclass
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from common.catalog import Catalog
from common.markets import MarketSource
from common.methods import get_method
from common.model import ModelConfig, SplitRecommender, get_arrays, shared_parameter_names
from server.strategy import MarketFedAvg


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
    out_dir: str  # history.json and checkpoint.pt go here

    def __post_init__(self) -> None:
        get_method(self.method)
        if self.num_server_rounds < 1:
            raise ValueError(f"num-server-rounds must be at least 1, got {self.num_server_rounds}.")
        if self.min_nodes < 1:
            raise ValueError(f"min-nodes must be at least 1, got {self.min_nodes}.")

    @classmethod
    def from_run_config(cls, run_config: dict) -> "ServerConfig":
        """Map the kebab-case run config keys onto the dataclass fields."""
        values = {}
        for name, field in cls.__dataclass_fields__.items():
            key = name.replace("_", "-")
            if key not in run_config:
                raise KeyError(f"The run config has no '{key}' (needed by the ServerApp).")
            values[name] = field.type(run_config[key])
        return cls(**values)

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
    """Extra evaluate settings of the last round: fedper-ft's fine-tuning."""
    if not get_method(config.method).fine_tune:
        return ConfigRecord()
    final = config.train_config()
    final["fine-tune-epochs"] = config.fine_tune_epochs
    return final


def initial_arrays(config: ServerConfig) -> ArrayRecord:
    """The seeded starting point of everything the method shares."""
    if config.catalog_path:
        catalog = Catalog.load(config.catalog_path)
    else:
        catalog = MarketSource(config.data_dir, config.synthetic_markets, config.seed).catalog()
    torch.manual_seed(config.seed)
    # The head's user table is never shared, so one placeholder user suffices here.
    model = SplitRecommender(
        ModelConfig(catalog.size, 1, config.embedding_dim, config.history_length, config.user_embeddings)
    )
    names = shared_parameter_names(model, get_method(config.method).share_head)
    return ArrayRecord(get_arrays(model, names))


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Evaluate the starting point, then run the configured rounds of FedAvg."""
    config = ServerConfig.from_run_config(context.run_config)
    log(INFO, "Federated %s for %d rounds, writing to %s", config.method, config.num_server_rounds, config.out_dir)
    strategy = MarketFedAvg(
        out_dir=Path(config.out_dir),
        run_config=asdict(config),
        num_rounds=config.num_server_rounds,
        final_evaluate_config=final_evaluate_config(config),
        min_train_nodes=config.min_nodes,
        min_evaluate_nodes=config.min_nodes,
        min_available_nodes=config.min_nodes,
    )
    arrays = initial_arrays(config)
    # Round 0: every market evaluates the untrained starting point, the
    # reference that later rounds must improve on.
    replies = grid.send_and_receive(strategy.configure_evaluate(0, arrays, ConfigRecord(), grid))
    strategy.aggregate_evaluate(0, replies)

    def checkpoint(server_round: int, round_arrays: ArrayRecord) -> None:
        if server_round > 0:
            strategy.checkpoint(server_round, round_arrays)

    strategy.start(
        grid=grid,
        initial_arrays=arrays,
        num_rounds=config.num_server_rounds,
        train_config=config.train_config(),
        evaluate_fn=checkpoint,
    )
