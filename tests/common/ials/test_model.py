"""The iALS model's pieces that serve and evaluate (common.ials.model)."""

import numpy as np
import pytest
import torch

from common.ials import model as ials_model
from common.ials.core import ItemFactors


@pytest.mark.parametrize("block", [1, 2, 1 << 17])
def test_history_means_by_hand_in_blocks_of_users(monkeypatch, block):
    # Prepare: factors for catalog rows 2 and 5; row 7 has none (a zero vector); 0 pads.
    monkeypatch.setattr(ials_model, "HISTORY_BLOCK", block)
    items = ItemFactors(np.array([2, 5]), np.array([[1.0, 0.0], [0.0, 2.0]]))
    history = torch.tensor([[2, 5, 0], [7, 5, 0], [0, 0, 0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])

    # Execute
    means = ials_model.history_means(items, history, mask)

    # Assert: (y2 + y5)/2, (0 + y5)/2, and zero for an empty history.
    np.testing.assert_allclose(means, [[0.5, 1.0], [0.0, 1.0], [0.0, 0.0]])
