"""DP-SGD local training with Opacus (ghost clipping) under a market's privacy ledger.

Everything a market trains on its private data goes through DP-SGD, head
included: a head trained without DP would leak into later encoder gradients.

The unit of privacy is the user, with all their interactions. A user's
history is an input of every one of their examples, so one interaction
reaches the gradients of all the user's other interactions: clipping one
interaction's gradient would not bound its influence. Poisson sampling
therefore picks users; each sampled user contributes one clipped gradient,
that of their mean loss over up to ``user_positives`` of their training items.
"""

import os
import warnings
from itertools import count

import torch
from torch import nn
from torch.utils.data import TensorDataset

from common.data.markets import market_seed
from common.methods import Method, local_round
from common.neural.model import CatalogEmbedding, SplitRecommender
from common.neural.train import MarketTensors, TrainConfig, user_batch_inputs
from common.privacy.ghost_norms import register_norm_samplers
from common.privacy.ledger import (
    PrivacyBudget,
    PrivacyBudgetExceeded,
    PrivacyLedger,
    calibrated_ledger,
    default_delta,
    epsilon_of,
    release_history,
    release_noise,
    sample_rate,
    steps_per_epoch,
)


def privacy_units(data: MarketTensors) -> int:
    """The market's units of privacy as DP-SGD counts them: its released user count if it has one, else its users.

    The sample rate, the steps per epoch and the noise's scale are computed from this number,
    which under DP is public (released with noise and recorded in the ledger); the users
    actually sampled are all of the market's, each with that probability.
    """
    return data.released_users if data.released_users is not None else data.split.num_users


def market_budget(
    data: MarketTensors, epsilon: float, delta: float, max_grad_norm: float, accountant: str
) -> PrivacyBudget:
    """The market's budget for a training; ``delta`` 0 picks :func:`default_delta` of its users."""
    return PrivacyBudget(epsilon, delta or default_delta(privacy_units(data)), max_grad_norm, accountant)


def dp_generator(insecure_seed: int | None = None) -> torch.Generator:
    """A generator for DP noise or Poisson sampling, seeded from the operating system's secure source.

    DP holds only if whoever sees a market's output cannot predict its noise,
    so the noise never comes from a configured seed: the server, or whoever
    submits the run, knows every seed in the run config. Each generator gets 64
    fresh bits of ``os.urandom``, and :func:`train_epochs_private` reseeds its
    noise generator so before every step. ``insecure_seed`` (only with the run's
    ``dp-insecure-seeded-noise``) makes the noise reproducible, and removable
    by anyone who knows the seed.
    """
    seed = int.from_bytes(os.urandom(8), "little") if insecure_seed is None else insecure_seed
    return torch.Generator().manual_seed(seed)


def popularity_seed(market: str, seed: int) -> int:
    """Seeds the noise of a market's popularity release in an insecure, reproducible run."""
    return market_seed(market, seed) + 777


def private_steps(data: MarketTensors, config: TrainConfig) -> int:
    """DP-SGD steps one call of :func:`train_epochs_private` records."""
    return config.epochs * steps_per_epoch(privacy_units(data), config.batch_size)


class UserSoftmaxLoss(nn.Module):
    """Sampled-softmax loss of each user: the mean over their real positives.

    Opacus's ghost clipping calls it with ``reduction="none"`` and needs one
    loss per example, here per user.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reduction = "mean"

    def forward(self, scores: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        per_positive = nn.functional.cross_entropy(
            scores.flatten(0, 1), torch.zeros(real.numel(), dtype=torch.long), reduction="none"
        ).view(real.shape)
        per_user = (per_positive * real).sum(dim=1) / real.sum(dim=1).clamp(min=1.0)
        reductions = {"none": lambda: per_user, "mean": per_user.mean, "sum": per_user.sum}
        if self.reduction not in reductions:
            raise ValueError(f"Unknown reduction '{self.reduction}'; choose one of {sorted(reductions)}.")
        return reductions[self.reduction]()


def private_round_steps(data: MarketTensors, method: Method, config: TrainConfig) -> int:
    """DP-SGD steps one round of ``method`` records (FedRep's head epochs included)."""
    epochs = config.epochs + (config.head_epochs if method.alternating else 0)
    return epochs * steps_per_epoch(privacy_units(data), config.batch_size)


def can_afford_round(data: MarketTensors, method: Method, config: TrainConfig, ledger: PrivacyLedger) -> bool:
    """Whether ``ledger`` can pay for one round of ``method`` at the sample rate ``config`` makes the loader use."""
    rate = sample_rate(privacy_units(data), config.batch_size)
    return ledger.can_afford(private_round_steps(data, method, config), rate)


def private_round(
    model: SplitRecommender,
    data: MarketTensors,
    method: Method,
    config: TrainConfig,
    ledger: PrivacyLedger,
    seed: int,
    noise_seed: int | None = None,
) -> float:
    """:func:`common.methods.local_round` under DP-SGD; returns the last epoch's mean loss.

    ``seed`` drives what is not private (negatives, positives); ``noise_seed``
    is for insecure reproducible runs only (see :func:`dp_generator`).
    """
    if not can_afford_round(data, method, config, ledger):
        raise PrivacyBudgetExceeded(f"Market '{data.split.market}' cannot afford another round of {method.name}.")
    phases = count()

    def train(model: SplitRecommender, config: TrainConfig, seed: int, trainable: nn.Module | None) -> float:
        phase = next(phases)  # FedRep's second phase draws fresh noise seeds
        phase_seed = None if noise_seed is None else noise_seed + phase
        return train_epochs_private(model, data, config, ledger, seed, trainable=trainable, noise_seed=phase_seed)

    return local_round(model, data, method, config, seed, train=train)


def private_popularity(
    data: MarketTensors, rows: int, noise_multiplier: float, generator: torch.Generator
) -> torch.Tensor:
    """The log of the market's item counts, released with the Gaussian mechanism.

    Every user adds ``1 / sqrt(n)`` to each of their ``n`` training items, so
    one user moves the counts by at most 1 in L2 norm: the release has the
    privacy cost of one Gaussian step of ``noise_multiplier`` at sample rate
    1, which the ledger records. Noise is drawn for the market's public rows
    (``data.public_rows``, see :func:`_foreign_rows`); other rows get 0.

    ``generator`` draws the noise: :func:`dp_generator`, never a configured seed.

    Returns
    -------
    torch.Tensor
        ``log(1 + max(noisy count, 0))`` per catalog row, of length ``rows``.
    """
    items = data.user_items
    real = items >= 0
    weights = real / real.sum(dim=1, keepdim=True).clamp(min=1).sqrt()
    counts = torch.zeros(rows).index_add_(0, items[real], weights[real])
    released = data.public_rows
    noise = torch.randn(len(released), generator=generator)
    noisy = torch.zeros(rows)
    noisy[released] = counts[released] + noise_multiplier * noise
    return torch.log1p(noisy.clamp(min=0))


def start_private_training(
    model: SplitRecommender,
    data: MarketTensors,
    budget: PrivacyBudget,
    config: TrainConfig,
    total_steps: int,
    popularity_share: float,
    spent_before: PrivacyLedger | None = None,
    noise_seed: int | None = None,
) -> PrivacyLedger:
    """The ledger of a new training, calibrated once for all its DP-SGD steps.

    ``spent_before`` is the market's ledger of earlier trainings: the new
    release and steps compose with it and get what it leaves of ``budget``.
    ``noise_seed`` is for insecure reproducible runs only (:func:`dp_generator`).

    With ``popularity_share`` > 0 the market first releases its item
    popularity (:func:`private_popularity`) into the head's item bias, with
    noise that alone would spend that share of the budget; the ledger records
    the release, and the steps get what it leaves. Popularity ranks most of
    what a small market's users buy, and a direct release learns it for far
    less than DP-SGD does (macro test NDCG@10 on XMarket at epsilon 8: see
    the README).
    """
    prior = release_history(spent_before.releases) + spent_before.history if spent_before is not None else []
    if (spent := epsilon_of(budget, prior)) >= budget.epsilon:
        raise PrivacyBudgetExceeded(
            f"Market '{data.split.market}' has spent epsilon {spent:.3f} of its budget of {budget.epsilon}: "
            "nothing is left for a new training."
        )
    noise = release_noise(budget, popularity_share, prior) if popularity_share > 0 else 0.0
    ledger = calibrated_ledger(budget, privacy_units(data), config.batch_size, total_steps, noise, spent_before)
    if noise > 0:
        generator = dp_generator(noise_seed)
        prior = private_popularity(data, model.head.item_bias.num_embeddings, noise, generator)
        with torch.no_grad():
            model.head.item_bias.weight[:, 0] = prior
    return ledger


def _foreign_rows(trained: nn.Module, data: MarketTensors) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Each trained catalog table with a mask of the rows outside the market's public rows.

    No example of the market looks such a row up (histories, positives and
    negatives all come from the market's items), so its noisy gradient is pure
    noise: Adam would turn it into full-size random steps, which FedAvg then
    carries into the markets that do sell the item. Zeroing it after the noise
    is post-processing and costs no privacy. Under DP the mask is the market's
    public rows (``data.public_rows``), not the items its users bought: which
    rows move must not tell the server what they bought.
    """
    tables = [module.weight for module in trained.modules() if isinstance(module, CatalogEmbedding)]
    if not tables:
        return []
    outside = torch.ones(tables[0].shape[0], dtype=torch.bool)
    outside[data.public_rows] = False
    return [(weight, outside) for weight in tables]


def train_epochs_private(
    model: SplitRecommender,
    data: MarketTensors,
    config: TrainConfig,
    ledger: PrivacyLedger,
    seed: int,
    trainable: nn.Module | None = None,
    noise_seed: int | None = None,
) -> float:
    """Train ``model`` in place with DP-SGD for ``config.epochs``; record the steps.

    Parameters
    ----------
    model : SplitRecommender
        Trained in place; Opacus's hooks are removed before returning.
    data : MarketTensors
        The market's training data.
    config : TrainConfig
        Local settings; the score penalty is not used (it is not per-example).
    ledger : PrivacyLedger
        The market's ledger: its noise multiplier and clipping norm drive
        DP-SGD, and every step (empty Poisson batches included) is recorded.
    seed : int
        Seeds what is not private: which positives and negatives a sampled user trains on.
    trainable : nn.Module, optional
        Only this part of ``model`` is trained (FedRep's phases); the rest is
        frozen for the call. Default: the whole model.
    noise_seed : int, optional
        Seeds Poisson sampling and the DP noise in an insecure, reproducible
        run; without it both come from :func:`dp_generator`'s secure source.

    Returns
    -------
    float
        Mean training loss over the last epoch.

    Raises
    ------
    PrivacyBudgetExceeded
        If the round's steps would spend more than the budget; nothing is trained then.
    """
    steps = private_steps(data, config)
    rate = sample_rate(privacy_units(data), config.batch_size)
    if not ledger.can_afford(steps, rate):
        raise PrivacyBudgetExceeded(
            f"Market '{data.split.market}' cannot afford {steps} more DP-SGD steps: "
            f"epsilon would reach {ledger.epsilon_after(steps, rate):.3f} of {ledger.budget.epsilon}."
        )
    generator = torch.Generator().manual_seed(seed)
    sampling = dp_generator(noise_seed)
    noise = dp_generator(None if noise_seed is None else noise_seed + 1)

    kept = {id(parameter) for parameter in (trainable or model).parameters()}
    frozen = [parameter for parameter in model.parameters() if id(parameter) not in kept]
    for parameter in frozen:
        parameter.requires_grad_(False)
    optimizer = torch.optim.Adam((trainable or model).parameters(), lr=config.learning_rate)
    foreign_rows = _foreign_rows(trainable or model, data)
    model.train()  # Opacus refuses a module in eval mode
    from opacus import PrivacyEngine  # lazily: see common.privacy.calibrate_noise
    from opacus.data_loader import DPDataLoader

    # Poisson sampling of every user of the market at the public rate (Opacus's own loader,
    # built here so that the rate is not derived from the exact number of users).
    loader = DPDataLoader(TensorDataset(torch.arange(data.split.num_users)), sample_rate=rate, generator=sampling)

    register_norm_samplers()
    with warnings.catch_warnings():
        # Opacus warns that its secure_mode is off: that mode needs torchcsprng,
        # which is not published for torch 2; the generators above replace it.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=ledger.budget.accountant)
        engine.secure_rng = sampling
        private_model, private_optimizer, criterion, private_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,  # already Poisson-sampled: Opacus keeps it as it is
            criterion=UserSoftmaxLoss(),
            noise_multiplier=ledger.noise_multiplier,
            max_grad_norm=ledger.budget.max_grad_norm,
            poisson_sampling=False,
            grad_sample_mode="ghost",
            noise_generator=noise,
        )
        private_model.forbid_grad_accumulation()  # what Opacus does for its own Poisson loader
        # Opacus scales the noisy sum by the dataset's length times the rate; the public count's.
        private_optimizer.expected_batch_size = privacy_units(data) * rate
    # Opacus's secure-mode noise: each draw sums four Gaussians, against the
    # floating-point attacks on the Gaussian mechanism (see its _generate_noise).
    private_optimizer.secure_mode = noise_seed is None
    actual_rate = private_loader.sample_rate
    private_model.train()
    mean_loss = float("nan")
    with warnings.catch_warnings():
        # Ghost clipping's backward passes start at the loss, and the first
        # layer's inputs are item indices, which have no gradient: torch warns
        # about that on every step although nothing is wrong.
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        try:
            for _ in range(config.epochs):
                total, batches = 0.0, 0
                for (batch,) in private_loader:
                    # Ghost clipping cannot take an empty Poisson batch; skipping it
                    # releases nothing, and the ledger still counts the step.
                    if len(batch) == 0:
                        continue
                    inputs, real = user_batch_inputs(data, batch, config.user_positives, config.negatives, generator)
                    loss = criterion(private_model(*inputs), real)
                    private_optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if noise_seed is None:
                        noise.manual_seed(int.from_bytes(os.urandom(8), "little"))
                    if private_optimizer.pre_step():  # clips, sums and adds the noise
                        for weight, outside in foreign_rows:
                            weight.grad[outside] = 0.0
                        private_optimizer.original_optimizer.step()
                    total += float(loss.detach())
                    batches += 1
                mean_loss = total / max(batches, 1)
        finally:
            private_model._close()  # removes Opacus's hooks from ``model``
            for parameter in frozen:
                parameter.requires_grad_(True)
    # What the steps ran at, not what the ledger planned: the two differ if a
    # setting changed since the calibration.
    ledger.record(steps, private_optimizer.noise_multiplier, actual_rate)
    return mean_loss
