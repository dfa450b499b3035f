"""Registry of the federated methods: each a family and keyword-only options, and what one does locally.

A method belongs to a **family**, which says how it trains and what crosses the wire:

- ``"sgd"``: the neural split recommender (:mod:`common.neural`), trained by gradient steps in
  each market; the server averages the shared parameters;
- ``"als"``: fedals, implicit ALS (:mod:`common.ials`): users solved in closed form inside each
  market, item factors on the server from the markets' summed item statistics.

Within a family a method differs only by its options (which parameters are shared, FedRep's
alternation, a final fine-tuning, FedProx's proximal weight, a private transfer), so the apps
dispatch once on the family (``server.families``, ``clients.families``) and a new method of a
family is one entry here plus, if it trains differently, its branch of :func:`local_round`.
"""

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from common.neural.model import SplitRecommender, shared_parameter_names
from common.neural.train import MarketTensors, RankingMetrics, TrainConfig, evaluate, train_epochs
from common.selection import improves

Family = Literal["sgd", "als"]
FAMILIES: tuple[str, ...] = ("sgd", "als")


@dataclass(frozen=True, kw_only=True)
class Method:
    """A federated method: its family and its options, every one keyword-only.

    Parameters
    ----------
    name : str
        The name users pass (``--methods``, the run config's ``method``).
    family : {"sgd", "als"}
        How it trains and what crosses the wire (module docstring).
    description : str
        One line for tables and ``--help``.
    share_head : bool, default False
        The head's non-user parameters are averaged too (FedAvg, FedProx).
    alternating : bool, default False
        FedRep: each round the head first with the encoder frozen, then the encoder.
    fine_tune : bool, default False
        After the last round each market fine-tunes a private copy (fedper-ft).
    proximal_mu : float, default 0.0
        FedProx's μ (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020):
        the local objective adds ``μ/2 ‖w − w_received‖²`` over the shared parameters; 0 is off.
    base : str, default ""
        The method whose training this one runs before its own last step (fedper-ft: fedper).
    transfer : bool, default False
        Private transfer: after the last round each market refits its own data, without noise,
        on the shared part it received, and serves the fit only where it wins on validation
        (:mod:`common.ials.transfer`). Nothing of the fit is sent.
    """

    name: str
    family: Family
    description: str
    share_head: bool = False
    alternating: bool = False
    fine_tune: bool = False
    proximal_mu: float = 0.0
    base: str = ""
    transfer: bool = False

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"Method '{self.name}' has family {self.family!r}; choose one of {FAMILIES}.")
        if self.proximal_mu < 0:
            raise ValueError(f"Method '{self.name}' has proximal_mu {self.proximal_mu}; it must be at least 0.")
        if self.family == "als" and (self.share_head or self.alternating or self.fine_tune or self.proximal_mu):
            raise ValueError(f"Method '{self.name}' of the als family takes none of the sgd family's options.")


METHODS = {
    method.name: method
    for method in (
        Method(name="fedavg", family="sgd", share_head=True, description="everything but user embeddings is averaged"),
        Method(
            name="fedprox",
            family="sgd",
            share_head=True,
            proximal_mu=0.01,
            description="fedavg with FedProx's proximal term μ/2‖w − w_received‖² on the local objective (μ 0.01)",
        ),
        Method(name="fedper", family="sgd", description="encoder averaged; head local, trained jointly with it"),
        Method(
            name="fedrep",
            family="sgd",
            alternating=True,
            description="encoder averaged; each round the head, then the encoder",
        ),
        Method(
            name="fedper-ft",
            family="sgd",
            fine_tune=True,
            base="fedper",
            description="fedper, then every market fine-tunes its own fork",
        ),
        Method(
            name="fedals",
            family="als",
            description="implicit ALS: users solved in each market, items on the server from the markets' "
            "summed item statistics",
        ),
        Method(
            name="fedals-pt",
            family="als",
            base="fedals",
            transfer=True,
            description="fedals, then every market refits its own data without noise on "
            "the shared item factors (private transfer), kept where it wins validation",
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


EpochsTrainer = Callable[[SplitRecommender, TrainConfig, int, nn.Module | None], float]
"""Trains ``model`` for ``config.epochs`` with ``seed``, only ``trainable`` (None: all); returns the mean loss."""


def plain_epochs(data: MarketTensors) -> EpochsTrainer:
    """The trainer of :func:`local_round` without DP: :func:`common.neural.train.train_epochs` on ``data``."""

    def train(model: SplitRecommender, config: TrainConfig, seed: int, trainable: nn.Module | None) -> float:
        parameters = None if trainable is None else trainable.parameters()
        return train_epochs(model, [data], config, seed, parameters=parameters)

    return train


def local_round(
    model: SplitRecommender,
    data: MarketTensors,
    method: Method,
    config: TrainConfig,
    seed: int,
    train: EpochsTrainer | None = None,
) -> float:
    """A market's local work in one round of an sgd-family method; returns the last epoch's mean loss.

    ``train`` runs the epochs (default :func:`plain_epochs`; DP-SGD passes its own, see
    :func:`common.privacy.dp_sgd.private_round`), so the method's branches are written once.
    FedRep trains the head first (``config.head_epochs``), then the encoder. FedProx adds
    ``μ (w − w₀)`` to the gradient of every shared parameter, ``w₀`` the round's starting point (the
    received parameters, blended with the market's own copy when ``global-weight`` is below 1): the
    gradient of the proximal term. A market's own parameters (its user rows) have no anchor.
    """
    if method.family != "sgd":
        raise ValueError(f"local_round trains sgd-family methods; '{method.name}' is of family '{method.family}'.")
    if method.proximal_mu and train is not None:
        raise ValueError(
            f"Method '{method.name}' adds a proximal term to plain training only: under DP-SGD it would be "
            "clipped with each user's gradient. Train it without DP or choose fedavg."
        )
    train = train or plain_epochs(data)
    with _proximal(model, shared_parameter_names(model, method.share_head), method.proximal_mu):
        if method.alternating:
            train(model, replace(config, epochs=config.head_epochs), seed, model.head)
            return train(model, config, seed + 1, model.encoder)
        return train(model, config, seed, None)


@contextmanager
def _proximal(model: nn.Module, names: list[str], mu: float) -> Iterator[None]:
    """In the block, the gradient of each parameter in ``names`` gains ``mu (w − w₀)``, ``w₀`` its entry value."""
    if not mu:
        yield
        return
    handles = []
    named = dict(model.named_parameters())
    for parameter in (named[name] for name in names):
        anchor = parameter.detach().clone()
        handles.append(parameter.register_hook(lambda grad, w=parameter, w0=anchor: grad + mu * (w.detach() - w0)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


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
        if improves(valid.ndcg, best.valid.ndcg):  # a tie keeps the earlier epoch (0: the model as given)
            state = {name: value.detach().clone() for name, value in fork.state_dict().items()}
            best = FineTuned(epoch, valid, evaluate(fork, data, on_test=True), state)
    return best
