"""The server's history and checkpoint: what a resumed server starts from."""

import pytest
import torch
from flwr.app import ArrayRecord

from server.history import RunHistory


def test_resuming_keeps_the_completed_rounds_and_drops_the_unfinished_one(tmp_path):
    # Prepare: rounds 0-3 recorded, but round 2 was the last one checkpointed.
    history = RunHistory(tmp_path, {"seed": 0})
    for server_round in range(4):
        history.annotate(server_round, seconds=float(server_round))
    history.write()
    history.save_checkpoint(2, "training-7", ArrayRecord({"encoder.w": torch.ones(2)}), {"accountant": {"n": 2}})

    # Execute: a new server process reads the directory.
    resumed = RunHistory(tmp_path, {"seed": 0})
    checkpoint = resumed.load_checkpoint()

    # Assert
    assert (checkpoint.server_round, checkpoint.training_id) == (2, "training-7")
    assert torch.equal(checkpoint.arrays["encoder.w"], torch.ones(2))
    assert checkpoint.strategy_state == {"accountant": {"n": 2}}
    assert sorted(resumed.rounds) == [0, 1, 2]


def test_nothing_to_resume_is_not_an_error(tmp_path):
    assert RunHistory(tmp_path, {}).load_checkpoint() is None


def test_a_broken_checkpoint_is_named(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"\x00")

    with pytest.raises(ValueError, match="checkpoint.pt: not a checkpoint"):
        RunHistory(tmp_path, {}).load_checkpoint()
