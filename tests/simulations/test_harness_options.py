"""The harness's --set: any other app config key, typed like its default."""

import pytest

from common.runtime.command import UserError
from simulations import run as harness


def test_set_converts_each_value_to_the_type_of_its_default():
    args = harness.parse_args(
        [
            "--set",
            "dp-batch-size=512",
            "--set",
            "dp-learning-rate=0.02",
            "--set",
            "fold-evaluation=false",
            "--set",
            "dp-accountant=rdp",
        ]
    )

    assert args.app_config == {
        "dp-batch-size": 512,
        "dp-learning-rate": 0.02,
        "fold-evaluation": False,
        "dp-accountant": "rdp",
    }
    assert harness.run_config_for(args, "fedper", harness.Path("out"), 3)["dp-batch-size"] == 512


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("dp-batch-size", "takes KEY=VALUE"),
        ("no-such-key=1", "has no key 'no-such-key'"),
        ("dp-batch-size=lots", "expected a value of type int, got 'lots'"),
        ("fold-evaluation=yes", "expected true or false"),
        ("seed=3", "sets 'seed' from its own option"),
    ],
)
def test_set_refuses_what_it_cannot_apply(assignment, message, capsys):
    with pytest.raises(SystemExit):
        harness.parse_args(["--set", assignment])

    assert message in capsys.readouterr().err


def test_a_bad_market_setting_stops_the_harness_before_anything_starts(capsys):
    with pytest.raises(SystemExit):
        harness.parse_args(["--dp-epsilon", "-1"])

    assert "dp-epsilon must be 0 (no DP) or a positive budget, got -1.0" in capsys.readouterr().err


def test_market_epsilons_reach_the_run_config_and_cannot_be_set_twice(capsys):
    args = harness.parse_args(["--dp-epsilon", "8", "--dp-market-epsilons", "de=4,jp=2"])

    assert harness.run_config_for(args, "fedper", harness.Path("out"), 7)["dp-market-epsilons"] == "de=4,jp=2"
    with pytest.raises(SystemExit):
        harness.parse_args(["--dp-epsilon", "8", "--set", "dp-market-epsilons=de=4"])
    assert "sets 'dp-market-epsilons' from its own option" in capsys.readouterr().err


def test_a_market_epsilon_for_a_market_the_run_does_not_have_stops_the_harness(tmp_path):
    with pytest.raises(UserError, match=r"--dp-market-epsilons names \['m9'\], which are not markets of this run"):
        harness.main(
            ["--synthetic-markets", "2", "--dp-epsilon", "8", "--dp-market-epsilons", "m9=2", "--out", str(tmp_path)]
        )

    assert not any(tmp_path.iterdir())


def _local_dp(tmp_path, name: str, *flags: str) -> dict:
    return harness.main(
        [
            "--methods",
            "local",
            "--synthetic-markets",
            "1",
            "--num-server-rounds",
            "1",
            "--embedding-dim",
            "8",
            "--dp-epsilon",
            "8",
            "--out",
            str(tmp_path / name),
            *flags,
        ]
    )


def test_dp_noise_is_secure_unless_an_insecure_run_is_asked_for_and_marked(tmp_path):
    # Execute: the local DP baseline twice with one seed, then twice seeded on purpose.
    secure = [_local_dp(tmp_path, f"secure{run}") for run in range(2)]
    seeded = [_local_dp(tmp_path, f"seeded{run}", "--dp-insecure-seeded-noise") for run in range(2)]

    # Assert: the seed alone does not reproduce the noise; the flag does, and results.json says so.
    def macro(results: dict) -> float:
        return results["methods"]["local"]["macro"]["ndcg@10"]

    assert macro(secure[0]) != macro(secure[1])
    assert macro(seeded[0]) == macro(seeded[1])
    assert secure[0]["dp-noise"] == harness.DP_NOISE_SECURE
    assert seeded[0]["dp-noise"].startswith("INSECURE")
    assert seeded[0]["config"]["dp_insecure_seeded_noise"] is True
