"""The split model: what each method shares, and local training that learns."""

import numpy as np
import pytest
import torch

from common.data.catalog import Catalog
from common.data.markets import MarketSource, load_split
from common.methods import get_method
from common.neural.model import ModelConfig, SplitRecommender, get_arrays, set_arrays, shared_parameter_names
from common.neural.train import MarketTensors, TrainConfig, evaluate, train_epochs


def _model(user_embeddings: bool = True) -> SplitRecommender:
    torch.manual_seed(0)
    return SplitRecommender(ModelConfig(30, 5, dim=4, history_length=3, user_embeddings=user_embeddings))


def test_fedper_shares_only_the_encoder():
    names = shared_parameter_names(_model(), share_head=get_method("fedper").share_head)

    assert names and all(name.startswith("encoder.") for name in names)


def test_fedavg_shares_the_head_but_never_user_embeddings():
    model = _model()

    names = shared_parameter_names(model, share_head=get_method("fedavg").share_head)

    assert any(name.startswith("head.") for name in names)
    assert not any(name.startswith("head.user_embedding") for name in names)
    assert set(model.state_dict()) - set(names) == {"head.user_embedding.weight"}


def test_without_user_embeddings_no_parameter_is_indexed_by_user():
    model = _model(user_embeddings=False)

    shapes = [tuple(value.shape) for value in model.state_dict().values()]

    assert not any(name.startswith("head.user_embedding") for name in model.state_dict())
    assert all(5 not in shape[:1] for shape in shapes)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="Unknown federated method"):
        get_method("fedmagic")


def test_arrays_round_trip_and_reject_unknown_names():
    source, target = _model(), SplitRecommender(ModelConfig(30, 5, 4, 3))
    names = shared_parameter_names(source, share_head=False)

    set_arrays(target, get_arrays(source, names))

    for name in names:
        torch.testing.assert_close(target.state_dict()[name], source.state_dict()[name])
    with pytest.raises(KeyError, match="no parameters"):
        set_arrays(target, {"encoder.missing": np.zeros(1)})


def test_scores_have_one_column_per_candidate():
    model = _model()
    users = torch.tensor([0, 4])
    history = torch.tensor([[1, 2, 0], [3, 0, 0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    candidates = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])

    scores = model(users, history, mask, candidates)

    assert scores.shape == (2, 4)


def test_local_training_beats_the_untrained_model():
    # Prepare: one generated market, the model the clients use.
    source = MarketSource("", synthetic_markets=2, seed=0)
    catalog = source.catalog()
    data = MarketTensors.from_split(load_split(source, "m00", catalog), history_length=20)
    torch.manual_seed(0)
    model = SplitRecommender(ModelConfig(catalog.size, data.split.num_users, 16, 20))
    before = evaluate(model, data)

    # Execute
    loss = train_epochs(model, [data], TrainConfig(epochs=2), seed=0)
    after = evaluate(model, data)

    # Assert
    assert np.isfinite(loss)
    assert after.ndcg > before.ndcg + 0.1


def test_training_can_freeze_everything_but_the_given_parameters():
    source = MarketSource("", synthetic_markets=2, seed=0)
    catalog: Catalog = source.catalog()
    data = MarketTensors.from_split(load_split(source, "m01", catalog), history_length=10)
    model = SplitRecommender(ModelConfig(catalog.size, data.split.num_users, 8, 10))
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}

    train_epochs(model, [data], TrainConfig(epochs=1), seed=0, parameters=model.head.parameters())

    for name, value in model.encoder.state_dict().items():
        torch.testing.assert_close(value, encoder_before[name])


def test_test_time_history_adds_the_validation_item_to_the_training_history():
    # Prepare
    source = MarketSource("", synthetic_markets=2, seed=0)
    split = load_split(source, "m01", source.catalog())
    user = int(split.valid.users[0])
    valid_item = int(split.valid.candidates[0, 0])
    train_items = split.train_items[split.train_users == user]

    # Execute
    data = MarketTensors.from_split(split, history_length=len(train_items) + 1)
    history, mask = data.user_history(torch.tensor([user]))
    test_history, test_mask = data.user_history(torch.tensor([user]), for_test=True)

    # Assert
    assert history[0, mask[0] > 0].tolist() == train_items.tolist()
    assert test_history[0, test_mask[0] > 0].tolist() == [*train_items.tolist(), valid_item]
