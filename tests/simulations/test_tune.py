"""xmfl tune: trials are federated trainings, chosen on validation, resumable; only metrics come back."""

import json
import shlex
import tomllib

import optuna
import pytest

from common import protocol
from common.ials.wire import REPLY_KEYS
from common.runtime.command import UserError
from simulations import run as harness_module
from simulations import tune
from tests import in_process
from tests.cli_check import fails_with
from tests.in_process import in_process_federated


class RecordingGrid(in_process.ClientAppGrid):
    """The real ClientApps, with every reply a market sends kept for inspection."""

    replies: list = []

    def answer(self, message):
        reply = super().answer(message)
        RecordingGrid.replies.append((message.metadata.message_type, reply.content))
        return reply


@pytest.fixture
def in_process_trials(monkeypatch):
    """Trials train the federation in this process, through grids that record the markets' replies."""
    RecordingGrid.replies = []
    monkeypatch.setattr(harness_module, "run_federated", in_process_federated)
    monkeypatch.setattr(in_process, "ClientAppGrid", RecordingGrid)
    return RecordingGrid.replies


@pytest.mark.usefixtures("server_task_identity")
def test_tuning_picks_the_best_trial_on_validation_and_resumes(tmp_path, in_process_trials):
    # Prepare: two generated markets, trials of at most 2 rounds, a setting every trial keeps.
    argv = ["--synthetic-markets", "2", "--max-rounds", "2", "--set", "als-wire=float32", "--out", str(tmp_path)]

    # Execute: two trials; a third left running, as by a search that was killed; then the same
    # search asked for four in all (the stale trial fails, one more runs).
    tune.main([*argv, "--trials", "2"])
    optuna.load_study(study_name="fedals-seed0", storage=f"sqlite:///{tmp_path / 'tune.db'}").ask()
    report = tune.main([*argv, "--trials", "4"])

    # Assert: four trials, the first the app's defaults (rounds clipped into the space).
    states = [t["state"] for t in report["trials"]]
    assert states == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]
    trials = [t for t in report["trials"] if t["state"] == "COMPLETE"]
    assert [t["number"] for t in trials] == [0, 1, 3]
    assert trials[2]["settings"] != trials[1]["settings"]  # the resumed search does not repeat its first draws
    assert len(list((tmp_path / "trials").iterdir())) == 3
    assert trials[0]["settings"] == tune.default_settings(
        harness_module.app_defaults(), tune.SearchSpace(rounds=(2, 2))
    )
    for trial in trials:
        # Each trial's score is the macro of its markets' validation NDCG@10 at their best rounds.
        results = json.loads((tmp_path / "trials" / f"{trial['number']:03d}" / "results.json").read_text())
        per_market = results["methods"]["fedals"]["per_market"]
        assert trial["val-ndcg@10"] == pytest.approx(sum(m["val-ndcg@10"] for m in per_market.values()) / 2)
        assert trial["test-ndcg@10"] == pytest.approx(sum(m["ndcg@10"] for m in per_market.values()) / 2)
    best = max(trials, key=lambda t: t["val-ndcg@10"])  # max keeps the first of equals, as best_by
    assert report["best"]["number"] == best["number"]
    assert report["best"]["settings"] == best["settings"]
    assert json.loads((tmp_path / "tune.json").read_text())["best"] == report["best"]
    # The written settings are the best's and the kept ones, in forms simulate and flwr run accept.
    config = tomllib.loads((tmp_path / "best-config.toml").read_text())
    assert config == {**best["settings"], "als-wire": "float32"}
    line = shlex.split((tmp_path / "best-settings.txt").read_text())
    parsed = harness_module.parse_args(line)
    assert parsed.num_server_rounds == best["settings"]["num-server-rounds"]
    assert parsed.app_config == {
        **{k: v for k, v in best["settings"].items() if k != "num-server-rounds"},
        "als-wire": "float32",
    }
    # A resumed search of another problem is refused, naming the file.
    with pytest.raises(UserError, match="holds a search of other data or settings"):
        tune.main([*argv[:-2], "--max-rounds", "3", "--out", str(tmp_path), "--trials", "4"])
    assert (tmp_path / "tune.png").stat().st_size > 0


@pytest.mark.usefixtures("server_task_identity")
def test_nothing_but_a_fedals_trainings_messages_and_metrics_leaves_a_market(tmp_path, in_process_trials):
    # Prepare: the metrics a market may send, and the arrays of a fedals training reply.
    allowed_metrics = {
        protocol.NUM_EXAMPLES_KEY,
        protocol.TRAINED_KEY,
        protocol.TRAIN_LOSS_KEY,
        protocol.TRAIN_SECONDS_KEY,
        *protocol.EVALUATION_METRICS,
        *(protocol.RECEIVED_PREFIX + key for key in (protocol.NUM_EXAMPLES_KEY, *protocol.EVALUATION_METRICS)),
    }

    # Execute: a search of two trials.
    tune.main(["--synthetic-markets", "2", "--max-rounds", "2", "--trials", "2", "--out", str(tmp_path)])

    # Assert: train replies hold fedals' statistics and metrics; evaluate replies metrics only.
    assert in_process_trials
    for message_type, content in in_process_trials:
        records = set(content.keys()) - {protocol.MARKET_KEY}
        if message_type == "train":
            assert records == {protocol.ARRAYS_RECORD, protocol.METRICS_RECORD}
            assert set(content[protocol.ARRAYS_RECORD].keys()) == set(REPLY_KEYS)
        else:
            assert records == {protocol.METRICS_RECORD}, message_type
        assert set(content[protocol.METRICS_RECORD].keys()) <= allowed_metrics


def test_tuning_refuses_dp_settings_and_searched_keys(capsys):
    # Execute and Assert: one line each, exit status 2, nothing run.
    assert "no DP budget accounts" in fails_with(capsys, ["tune", "--set", "dp-epsilon=4"])
    assert "no DP budget accounts" in fails_with(capsys, ["tune", "--set", "market-dp-noise-multiplier=1"])
    assert "is searched" in fails_with(capsys, ["tune", "--set", "als-alpha=3"])
