"""Registry of the federated personalization methods and what each one does locally."""

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch

from common.neural.model import SplitRecommender
from common.neural.train import MarketTensors, RankingMetrics, TrainConfig, evaluate, train_epochs


@dataclass(frozen=True)
class Method:
    """How a federated method splits the model and trains its part each round."""

    name: str
    share_head: bool  # the head's non-user parameters are averaged too (FedAvg)
    alternating: bool  # FedRep: head first with the encoder frozen, then the encoder
    fine_tune: bool  # after the last round each market fine-tunes a private copy
    description: str
    base: str = ""  # the method whose training this one runs before its own last step (fedper-ft: fedper)
    # "sgd": markets train the split model by gradient steps; "als": implicit ALS, users solved
    # in closed form inside each market and item factors on the server (clients.fedals, server.fedals).
    solver: Literal["sgd", "als"] = "sgd"
    # Private transfer: after the last round each market refits its own data, without noise, on the
    # shared part it received, and serves the fit only if it wins on validation (common.ials.transfer).
    # Nothing of the fit is sent: it is the model the market serves its own users.
    transfer: bool = False


METHODS = {
    method.name: method
    for method in (
        Method("fedavg", True, False, False, "everything but user embeddings is averaged"),
        Method("fedper", False, False, False, "encoder averaged; head local, trained jointly with it"),
        Method("fedrep", False, True, False, "encoder averaged; each round the head, then the encoder"),
        Method("fedper-ft", False, False, True, "fedper, then every market fine-tunes its own fork", base="fedper"),
        Method(
            "fedals",
            False,
            False,
            False,
            "implicit ALS: users solved in each market, items on the server from the markets' summed item statistics",
            solver="als",
        ),
        Method(
            "fedals-pt",
            False,
            False,
            False,
            "fedals, then every market refits its own data without noise on "
            "the shared item factors (private transfer), kept where it wins validation",
            base="fedals",
            solver="als",
            transfer=True,
        ),
    )
}
# References, never candidates of the per-market selection; implicit-* are the implicit
# library's ALS (a benchmark extra, simulations.baselines.run_implicit).
BASELINES = ("local", "pooled", "popular", "pooled-ials", "implicit-local", "implicit-pooled")


def transfer_variant(name: str) -> str | None:
    """The private-transfer variant of method ``name`` (fedals: fedals-pt), or None when it has none."""
    return next((method.name for method in METHODS.values() if method.transfer and method.base == name), None)


def get_method(name: str) -> Method:
    """The federated method called ``name``; raises on unknown names."""
    if name not in METHODS:
        raise ValueError(f"Unknown federated method '{name}'; choose one of {sorted(METHODS)}.")
    return METHODS[name]


def local_round(model: SplitRecommender, data: MarketTensors, method: Method, config: TrainConfig, seed: int) -> float:
    """A market's local work in one round; returns the last epoch's mean loss."""
    if method.alternating:
        head_phase = replace(config, epochs=config.head_epochs)
        train_epochs(model, [data], head_phase, seed, parameters=model.head.parameters())
        return train_epochs(model, [data], config, seed + 1, parameters=model.encoder.parameters())
    return train_epochs(model, [data], config, seed)


@dataclass(frozen=True)
class FineTuned:
    """The fine-tuned fork of a market at its best epoch on validation."""

    epochs: int  # 0 when no fine-tuning epoch beat the federated model
    valid: RankingMetrics
    test: RankingMetrics
    state: dict[str, torch.Tensor] | None = None  # the fork's parameters at that epoch (None: the model as given)


EpochTrainer = Callable[[SplitRecommender, TrainConfig, int], float]  # (model, one-epoch config, seed) -> loss


def fine_tune(
    model: SplitRecommender,
    data: MarketTensors,
    config: TrainConfig,
    epochs: int,
    seed: int,
    train_epoch: EpochTrainer | None = None,
) -> FineTuned:
    """Fine-tune a copy of ``model`` on the market alone, keeping the best epoch on validation.

    The copy is the market's private fork: ``model`` (and so the global
    encoder it holds) is left untouched. ``train_epoch`` trains the fork for
    one epoch (DP-SGD under a privacy budget); by default plain training.
    """
    trainer = train_epoch or (lambda fork, one_epoch, epoch_seed: train_epochs(fork, [data], one_epoch, epoch_seed))
    fork = copy.deepcopy(model)
    best = FineTuned(0, evaluate(fork, data), evaluate(fork, data, on_test=True))
    one_epoch = replace(config, epochs=1)
    for epoch in range(1, epochs + 1):
        trainer(fork, one_epoch, seed + epoch)
        valid = evaluate(fork, data)
        if valid.ndcg > best.valid.ndcg:
            state = {name: value.detach().clone() for name, value in fork.state_dict().items()}
            best = FineTuned(epoch, valid, evaluate(fork, data, on_test=True), state)
    return best
