"""DP-SGD local training with Opacus (ghost clipping) under a market's privacy ledger.

Everything a market trains on its private data goes through DP-SGD, head
included: a head trained without DP would leak into later encoder gradients.
The unit of privacy is one training interaction together with the negatives
sampled for it: Poisson sampling picks interactions, each contributes one
clipped gradient.
"""

import warnings
from dataclasses import replace

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.embedding_norms import register_embedding_norm_sampler
from common.methods import Method
from common.model import CatalogEmbedding, SplitRecommender
from common.privacy import PrivacyBudgetExceeded, PrivacyLedger, steps_per_epoch
from common.train import MarketTensors, TrainConfig, batch_inputs


def private_steps(data: MarketTensors, config: TrainConfig) -> int:
    """DP-SGD steps one call of :func:`train_epochs_private` records."""
    return config.epochs * steps_per_epoch(len(data.train_users), config.batch_size)


def private_round_steps(data: MarketTensors, method: Method, config: TrainConfig) -> int:
    """DP-SGD steps one round of ``method`` records (FedRep's head epochs included)."""
    epochs = config.epochs + (config.head_epochs if method.alternating else 0)
    return epochs * steps_per_epoch(len(data.train_users), config.batch_size)


def private_round(
    model: SplitRecommender, data: MarketTensors, method: Method, config: TrainConfig, ledger: PrivacyLedger, seed: int
) -> float:
    """:func:`common.methods.local_round` under DP-SGD; returns the last epoch's mean loss."""
    if not ledger.can_afford(private_round_steps(data, method, config)):
        raise PrivacyBudgetExceeded(f"Market '{data.split.market}' cannot afford another round of {method.name}.")
    if method.alternating:
        head_phase = replace(config, epochs=config.head_epochs)
        train_epochs_private(model, data, head_phase, ledger, seed, trainable=model.head)
        return train_epochs_private(model, data, config, ledger, seed + 1, trainable=model.encoder)
    return train_epochs_private(model, data, config, ledger, seed)


def _foreign_rows(trained: nn.Module, data: MarketTensors) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Each trained catalog table with a mask of the rows of items the market does not sell.

    No example of the market looks such a row up (histories, positives and
    negatives all come from the market's items), so its noisy gradient is pure
    noise: Adam would turn it into full-size random steps, which FedAvg then
    carries into the markets that do sell the item. Zeroing it after the noise
    is post-processing and costs no privacy.
    """
    tables = [module.weight for module in trained.modules() if isinstance(module, CatalogEmbedding)]
    if not tables:
        return []
    outside = torch.ones(tables[0].shape[0], dtype=torch.bool)
    outside[data.market_items] = False
    return [(weight, outside) for weight in tables]


def train_epochs_private(
    model: SplitRecommender,
    data: MarketTensors,
    config: TrainConfig,
    ledger: PrivacyLedger,
    seed: int,
    trainable: nn.Module | None = None,
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
        Seeds Poisson sampling, negatives and the DP noise.
    trainable : nn.Module, optional
        Only this part of ``model`` is trained (FedRep's phases); the rest is
        frozen for the call. Default: the whole model.

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
    if not ledger.can_afford(steps):
        raise PrivacyBudgetExceeded(
            f"Market '{data.split.market}' cannot afford {steps} more DP-SGD steps: "
            f"epsilon would reach {ledger.epsilon_after(steps):.3f} of {ledger.budget.epsilon}."
        )
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        TensorDataset(torch.arange(len(data.train_users))),
        batch_size=config.batch_size,
        generator=generator,
    )
    kept = {id(parameter) for parameter in (trainable or model).parameters()}
    frozen = [parameter for parameter in model.parameters() if id(parameter) not in kept]
    for parameter in frozen:
        parameter.requires_grad_(False)
    optimizer = torch.optim.Adam((trainable or model).parameters(), lr=config.learning_rate)
    foreign_rows = _foreign_rows(trainable or model, data)
    model.train()  # Opacus refuses a module in eval mode
    from opacus import PrivacyEngine  # lazily: see common.privacy.calibrate_noise

    register_embedding_norm_sampler()
    with warnings.catch_warnings():
        # Opacus warns that secure_mode is off: its noise is seeded for reproducibility.
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant=ledger.budget.accountant)
        private_model, private_optimizer, criterion, private_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            criterion=nn.CrossEntropyLoss(),
            noise_multiplier=ledger.noise_multiplier,
            max_grad_norm=ledger.budget.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode="ghost",
            noise_generator=torch.Generator().manual_seed(seed + 1),
        )
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
                    users, history, mask, candidates = batch_inputs(data, batch, config.negatives, generator)
                    scores = private_model(users, history, mask, candidates)
                    loss = criterion(scores, torch.zeros(len(batch), dtype=torch.long))
                    private_optimizer.zero_grad(set_to_none=True)
                    loss.backward()
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
    ledger.record(steps)
    return mean_loss
