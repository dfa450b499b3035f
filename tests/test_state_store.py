"""A market's durable state: saved after every round, restored by a restarted SuperNode."""

import pytest
import torch

from clients.state_store import MarketState, MarketStateStore


def test_a_saved_state_comes_back_unchanged(tmp_path):
    store = MarketStateStore(tmp_path / "state", "de")
    state = MarketState("run-1", 3, {"head.item_bias.weight": torch.arange(4.0)}, {"history": [[1.0, 0.1, 12]]},
                        own_arrays={"encoder.tower.bias": torch.ones(2)})

    store.save(state)
    restored = store.load()

    assert restored.training_id == "run-1" and restored.last_round == 3
    assert torch.equal(restored.head["head.item_bias.weight"], torch.arange(4.0))
    assert restored.ledger == {"history": [[1.0, 0.1, 12]]}
    assert torch.equal(restored.own_arrays["encoder.tower.bias"], torch.ones(2))
    assert [path.name for path in (tmp_path / "state").iterdir()] == ["de.pt"]


def test_a_market_without_saved_state_starts_afresh(tmp_path):
    assert MarketStateStore(tmp_path, "de").load() is None


def test_an_unreadable_state_file_is_named_and_left_in_place(tmp_path):
    (tmp_path / "de.pt").write_bytes(b"not a torch file")

    with pytest.raises(ValueError, match="de.pt: the saved market state cannot be read"):
        MarketStateStore(tmp_path, "de").load()
    assert (tmp_path / "de.pt").read_bytes() == b"not a torch file"
