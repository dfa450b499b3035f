"""The server's history and checkpoint: what a resumed server starts from, and how it is written."""

import json
import stat

import pytest
import torch

from server.history import Checkpoint, RunHistory, served_rounds, summary_lines


def _checkpoint(server_round: int = 2) -> Checkpoint:
    return Checkpoint(
        server_round=server_round,
        training_id="training-7",
        arrays={"encoder.w": torch.ones(2)},
        strategy_state={"accountant": {"n": 2}},
        fingerprint={"method": "fedper", "dp-epsilon": 8.0},
        markets={11: "de", 12: "jp"},
        continues="training-3",
    )


def test_resuming_keeps_the_completed_rounds_and_drops_the_unfinished_one(tmp_path):
    # Prepare: rounds 0-3 recorded, but round 2 was the last one checkpointed.
    history = RunHistory(tmp_path, {"seed": 0})
    for server_round in range(4):
        history.annotate(server_round, seconds=float(server_round))
    history.write()
    history.save_checkpoint(_checkpoint(2))

    # Execute: a new server process reads the directory.
    resumed = RunHistory(tmp_path, {"seed": 0})
    checkpoint = resumed.load_checkpoint()

    # Assert
    assert (checkpoint.server_round, checkpoint.training_id) == (2, "training-7")
    assert torch.equal(checkpoint.arrays["encoder.w"], torch.ones(2))
    assert checkpoint.strategy_state == {"accountant": {"n": 2}}
    assert checkpoint.fingerprint == {"method": "fedper", "dp-epsilon": 8.0}
    assert checkpoint.markets == {11: "de", 12: "jp"}
    assert checkpoint.continues == "training-3"  # a resumed continuation still names the training it continues
    assert sorted(resumed.rounds) == [0, 1, 2]


def test_nothing_to_resume_is_not_an_error(tmp_path):
    assert RunHistory(tmp_path, {}).load_checkpoint() is None


def test_a_broken_checkpoint_is_named(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"\x00")

    with pytest.raises(ValueError, match="checkpoint.pt: not a checkpoint"):
        RunHistory(tmp_path, {}).load_checkpoint()


def _saved(**changes) -> dict:
    saved = {
        "round": 2,
        "training-id": "t",
        "arrays": {"encoder.w": torch.ones(2)},
        "strategy-state": {},
        "fingerprint": {},
        "markets": {},
    }
    return {key: value for key, value in {**saved, **changes}.items() if value is not None}


@pytest.mark.parametrize(
    ("saved", "problem"),
    [
        ([1, 2], "holds a list, not a dict"),
        (_saved(round="two"), "'round' .* is a str, not a int"),
        (_saved(arrays=[torch.ones(2)]), "'arrays' .* is a list, not a dict"),
        (_saved(arrays={"encoder.w": [1.0, 2.0]}), "'arrays' must map array names to tensors"),
        (_saved(**{"strategy-state": "rdp"}), "'strategy-state' .* is a str"),
        (_saved(markets=None), r"lacks \['markets'\]"),
        (_saved(markets={1: "de", 2: "de"}), "distinct market names"),
        (_saved(round=-1), "not a completed round"),
        (_saved(continues=7), "'continues' .* is a int, not a str"),
    ],
)
def test_a_loadable_but_wrongly_shaped_checkpoint_is_named_with_its_problem(tmp_path, saved, problem):
    torch.save(saved, tmp_path / "checkpoint.pt")

    with pytest.raises(ValueError, match=f"checkpoint.pt: .*{problem}"):
        RunHistory(tmp_path, {}).load_checkpoint()


def test_a_checkpoint_of_an_earlier_version_continues_no_training(tmp_path):
    torch.save(_saved(), tmp_path / "checkpoint.pt")  # written before checkpoints named the training continued

    assert RunHistory(tmp_path, {}).load_checkpoint().continues == ""


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"config": {}, "rounds": [{"round": 0, "per_m', "not valid JSON .* line 1 column"),
        ('{"config": {}}', "not a run history: no list of 'rounds'"),
        ("[]", "not a run history: no list of 'rounds'"),
        ('{"rounds": [{"round": "0", "per_market": {}}]}', r"rounds\[0\] is not a round entry"),
        ('{"rounds": [{"round": 0}]}', r"rounds\[0\] is not a round entry"),
    ],
)
def test_a_truncated_or_misshapen_history_is_named_with_its_problem(tmp_path, text, problem):
    torch.save(_saved(), tmp_path / "checkpoint.pt")
    (tmp_path / "history.json").write_text(text)

    with pytest.raises(ValueError, match=f"history.json: {problem}"):
        RunHistory(tmp_path, {}).load_checkpoint()


def test_history_and_checkpoint_are_private_and_written_through_unique_temporary_files(tmp_path):
    # Prepare: what the old shared temporary names would collide with (another writer's, or a stale one).
    (tmp_path / "history.json.tmp").mkdir()
    (tmp_path / "checkpoint.tmp").mkdir()
    history = RunHistory(tmp_path, {"seed": 0})
    history.annotate(0, seconds=1.0)

    # Execute
    history.write()
    history.save_checkpoint(_checkpoint(0))

    # Assert: both files complete, readable by the owner only, no temporary file left behind.
    for name in ("history.json", "checkpoint.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    assert json.loads((tmp_path / "history.json").read_text())["rounds"][0]["seconds"] == 1.0
    assert RunHistory(tmp_path, {}).load_checkpoint().server_round == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint.pt",
        "checkpoint.tmp",
        "history.json",
        "history.json.tmp",
    ]


def test_the_summary_tells_replied_failed_and_absent_markets_apart_and_groups_rounds_alike(tmp_path):
    # Prepare: de and jp reply in rounds 1-2; in round 3 jp fails and a node that never named its market fails
    # too; in round 4 jp is not connected; fr replied in round 1 only.
    history = RunHistory(tmp_path, {})
    quality = {"val-ndcg": 0.5, "test-ndcg": 0.4, "upload-bytes": 8}
    for server_round, markets in {1: ["de", "jp", "fr"], 2: ["de", "jp"], 3: ["de"], 4: ["de"]}.items():
        for market in markets:
            history.note(server_round, market, **quality)
    history.note(2, "jp", **{"val-ndcg": 0.9, "test-ndcg": 0.8})
    history.note_failed(2, ["fr"])
    history.note_failed(3, ["jp", "node 7"])

    # Execute
    lines = summary_lines(history, num_rounds=5, markets=["de", "jp"])

    # Assert
    assert lines == [
        "Training summary: 4 of 5 rounds completed, 3 markets known",
        "  round 1: all 3 markets replied",
        "  round 2: replied: de, jp; failed or silent: fr",
        "  round 3: replied: de; failed or silent: jp, node 7; absent: fr",
        "  round 4: replied: de; absent: fr, jp",
        "  best round by macro validation NDCG@10: 2 (validation 0.7000, test 0.6000, over the 2 markets evaluated)",
        "  round each market serves (its best by its own validation NDCG@10): de 1, fr 1, jp 2",
        "  files: none",
    ]


def test_the_round_each_market_serves_is_its_first_best_on_validation(tmp_path):
    # Prepare: de peaks in round 2, jp ties rounds 1 and 3; round 0 (untrained) scores highest and is never served.
    history = RunHistory(tmp_path, {})
    for r, de, jp in ((0, 0.9, 0.9), (1, 0.2, 0.5), (2, 0.4, 0.3), (3, 0.3, 0.5)):
        history.rounds[r] = {"round": r, "per_market": {"de": {"val-ndcg": de}, "jp": {"val-ndcg": jp}}}

    # Execute and Assert
    assert served_rounds(history) == {"de": 2, "jp": 1}
