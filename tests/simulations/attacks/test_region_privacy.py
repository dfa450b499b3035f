"""A DP region against a hostile server and run submitter: what its settings and replies allow.

The markets here are the real ClientApp with a deployed region's node config (its data file,
the catalog, a state directory), driven by :class:`simulations.attacks.hostile.HostileServer`,
which sends whatever a hostile ServerApp would.
"""

import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clients.messages import DP_REPORTED, public_reason
from clients.privacy_state import COUNT_NOISE_MULTIPLIER, RELEASED_USERS, MarketPrivacy
from common.data.catalog import Catalog
from common.data.split import split_market
from common.ials.core import MarketInteractions
from common.ials.dp import ReleaseConfig, noise_generator, private_release
from common.ials.model import initial_rows
from common.ials.wire import ASSORTMENT_KEY, INITIAL_ROWS_KEY, ITEM_ROWS_KEY
from common.privacy.ledger import PrivacyBudgetExceeded
from common.privacy.region import RegionPolicy, public_assortment
from common.run_config import RunConfig
from simulations.attacks import counting_oracle, delta_reset
from simulations.attacks.federation import fedals_run_config, regions
from simulations.attacks.hostile import MarketRefused
from simulations.attacks.settings import AttackSettings
from simulations.benchmarks import command as benchmark


@pytest.fixture
def quick(tmp_path):
    return AttackSettings(synthetic_markets=2, out=tmp_path, quick=True)


@pytest.fixture(scope="module")
def attacks_report(tmp_path_factory):
    """``xmfl benchmark attacks --quick`` (the README's command at the suite's size), once for the module."""
    out = tmp_path_factory.mktemp("attacks")
    benchmark.main(
        [
            "attacks",
            "--quick",
            "--synthetic-markets",
            "2",
            "--attacks",
            "counting-oracle,seeded-noise,delta-reset,server-paths",
            "--out",
            str(out),
        ]
    )
    report = json.loads((out / "attacks.json").read_text(encoding="utf-8"))
    assert (out / "attacks.md").read_text(encoding="utf-8").startswith("| attack |")
    return report


def _round_one(server, node, factors=8):
    """A round-1 train message (the seeded table's Gram) to market ``node``; its arrays and metrics."""
    catalog = Catalog.load(server.contexts[node].node_config["catalog-path"])
    config = fedals_run_config(AttackSettings(), **{"als-factors": factors})
    initial = initial_rows(np.arange(catalog.size), RunConfig.from_run_config(config).ials_config())
    gram = initial.factors.T @ initial.factors
    return server.arrays(
        node,
        "train",
        {"gram": gram.astype(np.float32)},
        {"server-round": 1, "training-id": "t", INITIAL_ROWS_KEY: True},
    )


# --- seeded noise is the region's choice, never the run's ------------------------------------------


def test_a_run_config_asking_for_seeded_noise_cannot_make_it_removable(attacks_report):
    report = attacks_report["seeded-noise"]

    # The run config's request is ignored: the regenerated noise leaves the noise in place...
    assert report["asked-by-run-config"]["noise-removed-markets"] == 0
    for result in report["markets"]["asked-by-run-config"].values():
        assert result["residual-std"] > 0.5 * result["noise-std"]
        # The noise the market added is the noise its ledger paid for (sums: σ_sums·√k).
        assert result["noise-std"] == pytest.approx(result["calibrated-noise-std"], rel=0.1)
    # ...while a region that chose it in its node config gets exactly what it chose.
    assert report["region-chose-seeded-noise"]["noise-removed-markets"] == 2


def test_a_node_config_seeded_noise_value_that_is_not_a_boolean_is_refused_by_its_key():
    with pytest.raises(
        ValueError, match=r"Market 'de': the node config's dp-insecure-seeded-noise must be true or false"
    ):
        RegionPolicy.from_node_config({"dp-insecure-seeded-noise": "no"}, "de")
    assert RegionPolicy.from_node_config({"dp-insecure-seeded-noise": "false"}).insecure_seeded_noise is False


# --- what a DP market reports --------------------------------------------------------------------


def test_the_metrics_of_a_dp_market_are_no_counting_oracle(attacks_report):
    report = attacks_report["counting-oracle"]

    assert report["exact-answers"] == 0 and report["queries"] == 6
    # The same queries against regions that chose exact metrics count exactly: the attack works.
    assert report["region-opted-in-to-exact-metrics"]["exact-answers"] == 6
    for answers in report["markets"].values():
        for answer in answers:
            assert set(answer["keys-sent"]) <= DP_REPORTED


def test_every_reply_of_a_dp_market_carries_only_what_dp_allows(quick):
    federation = regions(quick, "replies", users=120)
    server = federation.server(fedals_run_config(quick, **{"dp-epsilon": 8.0, "als-factors": 8}))

    arrays, metrics = _round_one(server, 0)
    items = np.arange(len(arrays[ASSORTMENT_KEY]), dtype=np.int64)
    factors = np.random.default_rng(0).normal(size=(len(items), 8)).astype(np.float32)
    gram = factors.astype(np.float64).T @ factors.astype(np.float64)
    evaluated = server.metrics(
        0,
        "evaluate",
        {"items": items, "factors": factors, "gram": gram, ITEM_ROWS_KEY: np.array([len(items)])},
        {"server-round": 1, "training-id": "t", "final-round": True},
    )
    _, received = server.arrays(
        0,
        "train",
        {"items": items, "factors": factors, "gram": gram, ITEM_ROWS_KEY: np.array([len(items)])},
        {"server-round": 2, "training-id": "t", "evaluate-received": True},
    )

    for reply in (metrics, evaluated, received):
        assert set(reply) <= DP_REPORTED
    # The weight is the released count, not the user count.
    entry = MarketPrivacy(server.contexts[0], federation.markets[0]).load()
    assert metrics["num-examples"] == evaluated["num-examples"] == entry.calibration[RELEASED_USERS]


def test_a_gram_inconsistent_with_the_sent_factors_is_refused(quick):
    federation = regions(quick, "gram", users=120)
    server = federation.server(fedals_run_config(quick, **{"als-factors": 2}))
    catalog = Catalog.load(federation.catalog_path)
    factors, _ = counting_oracle.crafted_table(catalog.size, 3)

    # A Gram of a table smaller than the factors sent (here: no table at all).
    with pytest.raises(MarketRefused, match="Gram is not YᵀY of a table holding the item factors it sent"):
        server.metrics(
            0,
            "evaluate",
            {
                "items": np.arange(catalog.size),
                "factors": factors,
                "gram": np.zeros((2, 2), np.float32),
                ITEM_ROWS_KEY: np.array([catalog.size]),
            },
            {"server-round": 1},
        )


@pytest.mark.parametrize("count", [0, 10**9])
def test_a_count_of_rows_with_a_factor_the_sent_table_cannot_have_is_refused(quick, count):
    # Prepare: consistent factors and Gram, with |I| below the non-zero rows sent or above the catalog.
    federation = regions(quick, "item-rows", users=120)
    server = federation.server(fedals_run_config(quick, **{"als-factors": 2}))
    catalog = Catalog.load(federation.catalog_path)
    factors, gram = counting_oracle.crafted_table(catalog.size, 3)

    # Execute / Assert: |I| sets every user's regularisation, so the market refuses what no table has.
    with pytest.raises(MarketRefused, match="item-rows"):
        server.metrics(
            0,
            "evaluate",
            {"items": np.arange(catalog.size), "factors": factors, "gram": gram, ITEM_ROWS_KEY: np.array([count])},
            {"server-round": 1},
        )


# --- the released rows and the user count --------------------------------------------------------


def test_under_dp_the_released_rows_do_not_depend_on_the_users(quick, tmp_path):
    # Prepare: the same region with and without a user who alone bought an item.
    federation = regions(quick, "rows", users=120)
    path = federation.node_configs[0]["data-path"]
    frame = pd.read_csv(path)
    rare = pd.DataFrame(
        {
            "userId": ["rare"] * 5,
            "itemId": ["only-rare-bought-this"] + list(frame.itemId[:4]),
            "rating": [5.0] * 5,
            "date": ["2020-01-01"] * 5,
        }
    )
    sent = {}
    for name, data in (("without", frame), ("with", pd.concat([frame, rare]))):
        data.to_csv(path, index=False)
        server = federation.server(fedals_run_config(quick, **{"dp-epsilon": 8.0, "als-factors": 8}))
        sent[name] = _round_one(server, 0)[0][ASSORTMENT_KEY]

    # Assert: the whole catalog, both times.
    catalog = Catalog.load(federation.catalog_path)
    np.testing.assert_array_equal(sent["with"], sent["without"])
    np.testing.assert_array_equal(sent["with"], np.arange(catalog.size))


def test_a_regions_product_list_is_its_released_rows(tmp_path):
    catalog = Catalog(("a", "b", "c", "d"), overflow_rows=2)
    (tmp_path / "products.txt").write_text("# sold in de\nb\nd\nnew-product\n", encoding="utf-8")

    rows = public_assortment(RegionPolicy(assortment_path=str(tmp_path / "products.txt")), catalog)

    np.testing.assert_array_equal(rows, np.unique([1, 3, int(catalog.rows(["new-product"])[0])]))
    assert len(public_assortment(RegionPolicy(), catalog)) == catalog.size


def test_the_user_count_leaves_only_noised_and_accounted(quick):
    federation = regions(quick, "count", users=120)
    server = federation.server(fedals_run_config(quick, **{"dp-epsilon": 8.0, "als-factors": 8}))

    _, metrics = _round_one(server, 0)

    entry = MarketPrivacy(server.contexts[0], federation.markets[0]).load()
    assert entry.ledger.releases == [COUNT_NOISE_MULTIPLIER]  # the count's release, before the rounds'
    assert metrics["num-examples"] == entry.calibration[RELEASED_USERS]


# --- a user adds at most one term to a row --------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.sampled_from([1, 2, 8]), colliding=st.integers(2, 12))
def test_colliding_rows_cannot_break_the_per_user_bound(seed, k, colliding):
    # Prepare: user 0 has `colliding` items that all landed on overflow row 9.
    rng = np.random.default_rng(seed)
    others_users = rng.integers(1, 5, size=20)
    others_items = rng.integers(0, 10, size=20)
    users = np.concatenate([[0] * colliding, others_users])
    items = np.concatenate([[9] * colliding, others_items])
    market = MarketInteractions(users, items, 5)
    keep = users != 0
    neighbour = MarketInteractions(users[keep], items[keep], 5)
    factors = rng.normal(size=(5, 3))
    release = ReleaseConfig(items_per_user=k)

    with_user = private_release(market, factors, np.arange(10), 0.0, noise_generator(0), release)
    without = private_release(neighbour, factors, np.arange(10), 0.0, noise_generator(0), release)

    for name, bound in {
        "sums": math.sqrt(k),
        "counts": math.sqrt(k),
        "gram": 1.0,
        "interaction-gram": float(k),
    }.items():
        change = with_user[name].astype(np.float64) - without[name].astype(np.float64)
        assert np.linalg.norm(change) <= bound * (1 + 1e-5) + 1e-6, name


def test_two_unknown_items_of_one_user_on_one_overflow_row_are_one_interaction():
    # Prepare: every unknown item lands on the one overflow row (400); user u bought two of them.
    catalog = Catalog(tuple(f"i{n:03d}" for n in range(400)), overflow_rows=1)
    bought = {
        "u": ["i000", "x1", "x2", "i001", "i002"],
        "v": [f"i{n:03d}" for n in range(150)],
        "w": [f"i{n:03d}" for n in range(150, 400)],
    }
    rows = [(user, item) for user, items in bought.items() for item in items]
    interactions = pd.DataFrame(
        {
            "user": [u for u, _ in rows],
            "item": [i for _, i in rows],
            "date": pd.Timestamp("2020-01-01"),
            "position": range(len(rows)),
        }
    )

    split = split_market("m", interactions, catalog, seed=0)

    # Assert: u trains on i000 and the overflow row once (i001, i002 are held out).
    u = split.user_ids.index("u")
    assert sorted(split.train_items[split.train_users == u].tolist()) == [0, 400]


# --- the budget period's delta, and a lost ledger ---------------------------------------------------


def test_a_later_run_cannot_reset_the_budget_through_delta(attacks_report):
    report = attacks_report["delta-reset"]

    assert report["fresh-releases"] == 0
    for market in report["markets"].values():
        assert market["ledger-delta"] == delta_reset.FIRST_DELTA
    assert report["most-lifetime-epsilon-at-first-delta"] <= delta_reset.EPSILON * 1.01


def test_a_lost_fedals_ledger_stops_dp_training(quick):
    federation = regions(quick, "lost", users=120)
    server = federation.server(fedals_run_config(quick, **{"dp-epsilon": 8.0, "als-factors": 8}))
    _round_one(server, 0)
    state = MarketPrivacy(server.contexts[0], federation.markets[0]).store

    state.path.unlink()

    with pytest.raises(MarketRefused, match="privacy ledger is missing"):
        _round_one(server, 0)


def test_a_run_cannot_set_a_delta_above_the_default(quick):
    # A δ near 1 would make any noise look private: the default, 0.1 / the released count, caps the run's.
    federation = regions(quick, "delta-cap", users=120)
    server = federation.server(fedals_run_config(quick, **{"dp-epsilon": 8.0, "dp-delta": 0.5, "als-factors": 8}))

    _, metrics = _round_one(server, 0)

    released = MarketPrivacy(server.contexts[0], federation.markets[0]).load().calibration[RELEASED_USERS]
    assert metrics["delta"] == pytest.approx(0.1 / released)


def test_a_budget_error_leaves_the_region_as_a_fixed_text():
    # Its numbers (steps, epsilon) are functions of the market's users.
    reason = public_reason(PrivacyBudgetExceeded("Market 'de' cannot afford 121 more DP-SGD steps: epsilon 8.1"))

    assert not any(character.isdigit() for character in reason)


# --- a run config cannot reach outside the server host's root ------------------------------------


def test_hostile_run_configs_reach_nothing_outside_the_server_hosts_root(attacks_report):
    bounded, everything = (
        attacks_report["server-paths"]["root-set"],
        attacks_report["server-paths"]["root-is-everything"],
    )

    # With the root set, every hostile run config is refused and nothing is made outside it.
    assert bounded["refused"] == bounded["attempts"] == 5 and bounded["files-created-outside-root"] == []
    # The attack works where the root is everything: the out-dirs outside are made (with the training's lock),
    # while the device catalog and the live out-dir are refused by their own checks whatever the root.
    assert {"out", "climbed"} <= set(everything["files-created-outside-root"])
    assert everything["outcomes"]["catalog-device"] == everything["outcomes"]["resume-live-out-dir"] == "refused"
