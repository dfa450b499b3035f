"""common.config and common.run_config: run and node config values parsed by their type, into one model."""

from dataclasses import fields

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.config import parse_bool, parse_value
from common.run_config import RunConfig
from simulations import run as harness
from xmfl.app import app_config


@pytest.mark.parametrize(
    "text, expected",
    [
        ("false", False),
        ("False", False),
        ("0", False),
        (0, False),
        ("true", True),
        ("TRUE", True),
        ("1", True),
        (1, True),
        (True, True),
    ],
)
def test_a_boolean_is_read_from_its_spelling_not_from_its_truthiness(text, expected):
    assert parse_bool("user-embeddings", text) is expected


@pytest.mark.parametrize("text", ["yes", "off", "", "2", 2, 0.5, None])
def test_a_value_that_is_not_a_boolean_is_refused_in_one_line_naming_the_key(text):
    with pytest.raises(ValueError, match=r"^user-embeddings must be true or false, got ") as error:
        parse_bool("user-embeddings", text)
    assert "\n" not in str(error.value)


def test_a_run_config_boolean_written_as_false_is_false():
    # bool("false") is True: a cast would have turned the setting on.
    config = RunConfig.from_run_config({**harness.app_defaults(), "user-embeddings": "false"})

    assert config.user_embeddings is False


@given(st.integers(min_value=-(10**9), max_value=10**9))
def test_whole_numbers_round_trip_through_text(number):
    assert parse_value("seed", int, str(number)) == number


@pytest.mark.parametrize("kind, text", [(int, "1.5"), (int, "x"), (float, "nan-ish"), (float, True)])
def test_a_number_of_the_wrong_kind_is_refused_naming_the_key(kind, text):
    with pytest.raises(ValueError, match="^seed must be"):
        parse_value("seed", kind, text)


def test_the_run_config_model_has_one_field_per_key_of_the_app_config():
    # Prepare: the app's defaults, the one place they live.
    defaults = app_config()

    # Execute
    config = RunConfig.from_run_config(defaults)

    # Assert: every key is a field and every field a key; values parsed by type.
    assert {field.name.replace("_", "-") for field in fields(RunConfig)} == set(defaults)
    assert config.method == defaults["method"] and isinstance(config.fold_evaluation, bool)


def test_the_run_config_refuses_a_text_false_that_is_not_a_boolean_and_reads_false_as_false():
    defaults = app_config()

    assert RunConfig.from_run_config({**defaults, "resume": "false"}).resume is False
    with pytest.raises(ValueError, match="resume must be true or false"):
        RunConfig.from_run_config({**defaults, "resume": "no"})
    with pytest.raises(ValueError, match="Unknown federated method"):
        RunConfig.from_run_config({**defaults, "method": "fedsgd"})


def test_fedprox_under_dp_is_refused_by_its_keys_before_any_market_trains():
    defaults = {**app_config(), "method": "fedprox"}

    with pytest.raises(ValueError, match="proximal term to plain training only"):
        RunConfig.from_run_config({**defaults, "dp-epsilon": 4.0})
    with pytest.raises(ValueError, match="proximal term to plain training only"):
        RunConfig.from_run_config({**defaults, "dp-epsilon": 4.0, "dp-market-epsilons": "m00=2"})
    assert RunConfig.from_run_config(defaults).method == "fedprox"


def test_the_harness_ials_references_train_with_the_runs_als_settings():
    # pooled-ials and blend are computed in the harness: with the --set values fedals trains with.
    args = harness.parse_args(["--methods", "local,pooled-ials", "--set", "als-factors=16"])

    assert harness.harness_ials_config(args, app_config()).factors == 16


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"method": "fedavg", "aggregation": "mean"}, "Unknown aggregation 'mean'"),
        ({"method": "fedavg", "aggregation": "krum", "market-dp-noise-multiplier": 1.0}, "set aggregation to fedavg"),
        ({"method": "fedavg", "aggregation": "krum", "aggregation-malicious": -1}, "must not be negative"),
        ({"method": "fedavg", "aggregation": "krum", "min-nodes": 4}, "at least 5 markets"),
        ({"method": "fedavg", "aggregation": "fedtrimmedavg", "min-nodes": 4}, "at least 5 markets"),
    ],
    ids=["unknown", "market-dp", "negative", "krum below 2f+3", "trimmed mean below 5"],
)
def test_an_aggregation_the_run_cannot_use_is_refused_by_its_key(settings, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_run_config({**app_config(), **settings})


def test_a_robust_aggregation_is_accepted_for_an_sgd_method_and_ignored_by_fedals():
    for method in ("fedper", "fedals"):  # fedals sums statistics: the harness may run it beside fedper
        config = RunConfig.from_run_config({**app_config(), "method": method, "aggregation": "fedmedian"})
        assert config.aggregation == "fedmedian" and config.aggregation_malicious == 1
    krum = {**app_config(), "method": "fedavg", "aggregation": "krum", "min-nodes": 5}
    assert RunConfig.from_run_config(krum).min_nodes == 5
