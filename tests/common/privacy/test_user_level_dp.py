"""User-level DP-SGD: one example is one user, and clipping bounds a whole user."""

import warnings
from dataclasses import replace

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from common.data.markets import MarketSource, load_split
from common.neural.model import ModelConfig, SplitRecommender
from common.neural.train import MarketTensors, user_batch_inputs
from common.privacy.dp_sgd import UserSoftmaxLoss, dp_generator, private_popularity
from common.privacy.ghost_norms import register_norm_samplers

pytestmark = pytest.mark.filterwarnings("ignore")


def _market() -> MarketTensors:
    source = MarketSource("", 3, 0)
    return MarketTensors.from_split(load_split(source, source.markets[2], source.catalog()), history_length=6)


def _model(data: MarketTensors) -> SplitRecommender:
    torch.manual_seed(0)
    rows = int(data.market_items.max()) + 1  # every item the market looks up
    model = SplitRecommender(ModelConfig(rows, data.split.num_users, dim=4, history_length=6))
    with torch.no_grad():
        model.encoder.tower.weight.normal_(std=0.3)  # a non-trivial tower, so every part has a gradient
    return model


def _per_user_losses(model: SplitRecommender, data: MarketTensors, users: torch.Tensor) -> torch.Tensor:
    loss = UserSoftmaxLoss()
    loss.reduction = "none"
    inputs, real = user_batch_inputs(data, users, 4, 3, torch.Generator().manual_seed(1))
    return loss(model(*inputs), real)


def test_a_users_example_depends_on_that_users_data_only():
    # Prepare: the same market, except that user 1's items are replaced by others of the market.
    data = _market()
    other_items = data.market_items[torch.randperm(len(data.market_items), generator=torch.Generator().manual_seed(3))]
    user_items = data.user_items.clone()
    count = int((user_items[1] >= 0).sum())
    user_items[1, :count] = other_items[:count]
    history = data.history.clone()
    history[1] = other_items[count : count + history.shape[1]]
    changed = replace(data, user_items=user_items, history=history)
    model, users = _model(data), torch.tensor([0, 1, 2])

    # Execute
    before = _per_user_losses(model, data, users)
    after = _per_user_losses(model, changed, users)

    # Assert: only user 1's example changed, so one clipped example bounds one user.
    assert before[1] != after[1]
    torch.testing.assert_close(before[[0, 2]], after[[0, 2]])


def test_ghost_clipping_norms_are_the_norms_of_each_users_whole_gradient():
    # Prepare: brute force, one backward pass per user over their mean loss.
    data = _market()
    model, users = _model(data), torch.arange(5)
    expected = []
    for user in users:
        model.zero_grad()
        _per_user_losses(model, data, users)[user].backward()
        expected.append(torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None)))

    # Execute: Opacus's ghost clipping with the project's embedding norms, same batch.
    from opacus import PrivacyEngine

    register_norm_samplers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private_model, _, criterion, _ = PrivacyEngine().make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(users), batch_size=len(users)),
            criterion=UserSoftmaxLoss(),
            noise_multiplier=0.0,
            max_grad_norm=1.0,
            grad_sample_mode="ghost",
        )
        inputs, real = user_batch_inputs(data, users, 4, 3, torch.Generator().manual_seed(1))
        criterion(private_model(*inputs), real).backward()

    # Assert
    torch.testing.assert_close(private_model.per_sample_gradient_norms, torch.stack(expected), rtol=1e-4, atol=1e-6)


def test_popularity_release_counts_each_user_at_most_once_in_l2():
    # Prepare
    data = _market()
    rows = int(data.market_items.max()) + 1

    # Execute: without noise the release is log(1 + counts), each user adding 1/sqrt(n) to each of n items.
    released = private_popularity(data, rows, noise_multiplier=0.0, generator=dp_generator())

    # Assert
    items, real = data.user_items, data.user_items >= 0
    weight = 1 / real.sum(dim=1, keepdim=True).sqrt()
    counts = torch.zeros(rows).index_add_(0, items[real], weight.expand_as(items)[real])
    torch.testing.assert_close(released, torch.log1p(counts))
    assert torch.all(weight.squeeze(1).pow(2) * real.sum(dim=1) <= 1 + 1e-6)  # each user's L2 contribution
