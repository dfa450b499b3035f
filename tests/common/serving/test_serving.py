"""A market's served model: written once, refused when it does not fit, answering every user and item."""

import dataclasses
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import Context, RecordDict

from clients import recommend as recommend_cli
from clients import score as score_cli
from clients.served import BEST_FILE_SUFFIX, BEST_INFO_KEY, KEPT_METRICS, remember_if_best, write_best_model
from common.data.catalog import Catalog
from common.data.markets import MarketSource, load_split
from common.data.metrics import ndcg_at_k, rank_of_positive
from common.methods import get_method
from common.neural.model import ModelConfig, SplitRecommender
from common.neural.train import MarketTensors, TrainConfig, evaluate, train_epochs
from common.runtime import durable
from common.serving import format as serving
from common.serving import query
from common.serving.format import FORMAT_VERSION, SERVED_FILES, ServedModelError, market_user_ids, write_served_model
from common.serving.query import load_served_model
from server.resume import catalog_digest
from simulations.baselines import BaselineSettings, run_local, run_pooled
from tests.paths import REPO, XMARKET_DIR

SOURCE = MarketSource("", 3, 0)
MARKET = "m01"
HISTORY_LENGTH = 10


def _manifest(market: str = MARKET, **metrics: float) -> dict:
    return {"method": "local", "market": market, "round": 2, "metrics": metrics, "epsilon": None, "delta": None}


def _trained(user_embeddings: bool = False, user_offset: int = 0, extra_users: int = 0):
    """A model trained two epochs on MARKET; with an offset, as the pooled model holds a market."""
    catalog = SOURCE.catalog()
    split = load_split(SOURCE, MARKET, catalog)
    data = MarketTensors.from_split(split, HISTORY_LENGTH, user_offset=user_offset)
    torch.manual_seed(0)
    config = ModelConfig(catalog.size, user_offset + split.num_users + extra_users, 16, HISTORY_LENGTH, user_embeddings)
    model = SplitRecommender(config)
    train_epochs(model, [data], TrainConfig(epochs=2), seed=0)
    return model, data, catalog


@pytest.fixture(scope="module")
def served_dir(tmp_path_factory):
    model, data, catalog = _trained()
    directory = tmp_path_factory.mktemp("served") / MARKET
    test = evaluate(model, data, on_test=True)
    write_served_model(
        directory,
        model,
        data,
        catalog,
        _manifest(**{"test-ndcg": test.ndcg}),
        user_ids=market_user_ids(SOURCE.interactions(MARKET)),
    )
    return directory, model, data, catalog


def _bought(data: MarketTensors, catalog: Catalog, user_ids: list[str]) -> dict[str, set[str]]:
    """Every item each user interacted with: training, validation and test."""
    split = data.split
    users = np.concatenate([split.train_users, split.valid.users, split.test.users])
    rows = np.concatenate([split.train_items, split.valid.candidates[:, 0], split.test.candidates[:, 0]])
    bought: dict[str, set[str]] = {}
    for user, row in zip(users.tolist(), rows.tolist(), strict=True):
        bought.setdefault(user_ids[user], set()).add(catalog.item_ids[row])
    return bought


def _test_pairs(data: MarketTensors, catalog: Catalog, user_ids: list[str]) -> pd.DataFrame:
    """The run's own test candidates as (userId, itemId) pairs, 100 a user, positive first."""
    test = data.split.test
    width = test.candidates.shape[1]
    return pd.DataFrame(
        {
            "userId": np.repeat(np.asarray(user_ids, dtype=object)[test.users], width),
            "itemId": np.asarray(catalog.item_ids, dtype=object)[test.candidates.ravel()],
        }
    )


def _served_test_ndcg(served: query.ServedModel, data: MarketTensors, catalog: Catalog) -> float:
    scores = served.score(_test_pairs(data, catalog, served.user_ids), as_of="test")["score"].to_numpy()
    return ndcg_at_k(rank_of_positive(scores.reshape(len(data.split.test.users), -1)))


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=120
    )


# --- The directory: what it holds, written whole, refused when it does not fit.


def test_round_trip_keeps_parameters_users_and_manifest(served_dir):
    directory, model, data, catalog = served_dir

    served = load_served_model(directory, catalog)

    assert sorted(os.listdir(directory)) == sorted(SERVED_FILES)
    assert all(stat.S_IMODE((directory / name).stat().st_mode) == 0o600 for name in SERVED_FILES)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(served.model.state_dict()[name], value, rtol=0, atol=0)
    assert served.user_ids == market_user_ids(SOURCE.interactions(MARKET))
    assert served.model.config == model.config
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["market"] == MARKET and manifest["method"] == "local" and manifest["round"] == 2
    assert manifest["epsilon"] is None and manifest["delta"] is None
    assert manifest["catalog_fingerprint"] == catalog.fingerprint()
    assert manifest["package_version"] == serving.package_version() != ""
    assert manifest["model_config"]["num_users"] == data.split.num_users
    assert manifest["assortment_items"] == len(data.split.market_items)
    assert sorted(served.assortment) == sorted(catalog.item_ids[row] for row in data.split.market_items)


def test_served_model_reproduces_the_runs_test_ndcg_on_its_test_candidates(served_dir):
    directory, model, data, catalog = served_dir
    reported = evaluate(model, data, on_test=True).ndcg

    served_ndcg = _served_test_ndcg(load_served_model(directory), data, catalog)

    assert served_ndcg == pytest.approx(reported, abs=1e-6)
    assert json.loads((directory / "manifest.json").read_text())["metrics"]["test-ndcg"] == reported


def test_pooled_model_with_user_embeddings_is_cut_to_the_markets_users(tmp_path):
    model, data, catalog = _trained(user_embeddings=True, user_offset=37, extra_users=11)
    reported = evaluate(model, data, on_test=True).ndcg

    write_served_model(
        tmp_path / "m", model, data, catalog, _manifest(), user_ids=market_user_ids(SOURCE.interactions(MARKET))
    )
    served = load_served_model(tmp_path / "m", catalog)

    user_rows = served.model.state_dict()["head.user_embedding.weight"]
    assert len(user_rows) == data.split.num_users
    torch.testing.assert_close(user_rows, model.head.user_embedding.weight[37 : 37 + data.split.num_users])
    assert _served_test_ndcg(served, data, catalog) == pytest.approx(reported, abs=1e-6)


def test_a_model_from_another_catalog_is_refused_with_a_clear_message(served_dir):
    directory, _, _, catalog = served_dir
    other = Catalog(catalog.item_ids[:-1] + ("P-something-else",), catalog.overflow_rows)

    with pytest.raises(ServedModelError) as refused:
        load_served_model(directory, other)

    message = str(refused.value)
    assert str(directory) in message and "another catalog" in message
    assert catalog.fingerprint() in message and other.fingerprint() in message
    assert "\n" not in message


def test_a_catalog_file_that_does_not_match_the_manifest_is_refused(served_dir, tmp_path):
    directory, model, data, catalog = served_dir
    copy = tmp_path / "copy"
    write_served_model(copy, model, data, catalog, _manifest(), user_ids=market_user_ids(SOURCE.interactions(MARKET)))
    Catalog(tuple(reversed(catalog.item_ids)), catalog.overflow_rows).save(copy / "catalog.txt")

    with pytest.raises(ServedModelError, match="holds a catalog .* not the one its manifest names"):
        load_served_model(copy)


def _copy_with_format_version(served_dir, tmp_path: Path, version: int) -> Path:
    """The fixture's served model written again into ``tmp_path / "copy"``, its manifest saying ``version``."""
    _, model, data, catalog = served_dir
    copy = tmp_path / "copy"
    write_served_model(copy, model, data, catalog, _manifest(), user_ids=market_user_ids(SOURCE.interactions(MARKET)))
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": version}))
    return copy


def test_another_format_version_is_refused(served_dir, tmp_path):
    copy = _copy_with_format_version(served_dir, tmp_path, FORMAT_VERSION + 1)

    with pytest.raises(ServedModelError, match=f"format version {FORMAT_VERSION + 1}.*reads versions 1, 2 only"):
        load_served_model(copy)


def test_a_version_1_model_with_dense_tables_still_loads(served_dir, tmp_path):
    # Prepare: what version 1 wrote: the same files, every table dense, format_version 1.
    model = served_dir[1]
    copy = _copy_with_format_version(served_dir, tmp_path, 1)
    torch.save(model.state_dict(), copy / "model.pt")

    # Execute
    served = load_served_model(copy)

    # Assert
    for name, value in model.state_dict().items():
        assert torch.equal(served.model.state_dict()[name], value), name


def test_damaged_parameters_are_refused_naming_the_directory(served_dir, tmp_path):
    directory, model, data, catalog = served_dir
    copy = tmp_path / "copy"
    write_served_model(copy, model, data, catalog, _manifest(), user_ids=market_user_ids(SOURCE.interactions(MARKET)))
    (copy / "model.pt").write_bytes((copy / "model.pt").read_bytes()[:100])

    with pytest.raises(ServedModelError, match=f"{copy} has unusable parameters"):
        load_served_model(copy)


def test_missing_directory_and_missing_manifest_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()

    with pytest.raises(ServedModelError, match="no such directory"):
        load_served_model(tmp_path / "absent")
    with pytest.raises(ServedModelError, match="has no manifest.json"):
        load_served_model(tmp_path / "empty")


def test_rewriting_replaces_the_model_whole_and_a_failed_write_keeps_the_old_one(served_dir, tmp_path, monkeypatch):
    _, model, data, catalog = served_dir
    users = market_user_ids(SOURCE.interactions(MARKET))
    target = tmp_path / "model"
    write_served_model(target, model, data, catalog, {**_manifest(), "round": 1}, user_ids=users)

    write_served_model(target, model, data, catalog, {**_manifest(), "round": 7}, user_ids=users)
    assert json.loads((target / "manifest.json").read_text())["round"] == 7

    def fail(*_args, **_kwargs):
        raise OSError("disk full")

    # The disk fills after the new files are written, before they replace the old directory.
    monkeypatch.setattr(durable, "_fsync_directory", fail)
    with pytest.raises(OSError, match="disk full"):
        write_served_model(target, model, data, catalog, {**_manifest(), "round": 9}, user_ids=users)
    assert json.loads((target / "manifest.json").read_text())["round"] == 7
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["model"]


def test_writing_refuses_a_directory_that_is_not_a_served_model_and_a_wrong_manifest(served_dir, tmp_path):
    _, model, data, catalog = served_dir
    users = market_user_ids(SOURCE.interactions(MARKET))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")

    with pytest.raises(ValueError, match="is not a served model"):
        write_served_model(tmp_path / "notes", model, data, catalog, _manifest(), user_ids=users)
    with pytest.raises(ValueError, match="names market 'm02'"):
        write_served_model(tmp_path / "x", model, data, catalog, _manifest(market="m02"), user_ids=users)
    with pytest.raises(ValueError, match="lacks"):
        write_served_model(tmp_path / "x", model, data, catalog, {"method": "local"}, user_ids=users)
    anonymous = dataclasses.replace(data, split=dataclasses.replace(data.split, user_ids=()))
    with pytest.raises(ValueError, match="needs its user IDs"):
        write_served_model(tmp_path / "x", model, anonymous, catalog, _manifest())
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "x").exists()


def test_catalog_fingerprint_is_what_checkpoints_store():
    catalog = SOURCE.catalog()

    assert catalog.fingerprint() == catalog_digest(catalog)
    assert catalog.fingerprint() == Catalog(catalog.item_ids, catalog.overflow_rows).fingerprint()
    assert catalog.fingerprint() != Catalog(catalog.item_ids, catalog.overflow_rows + 1).fingerprint()
    assert catalog.fingerprint().startswith(f"{len(catalog.item_ids)} items + 64 overflow rows, sha256 ")


# --- Answers: recommendations and scores, for known and unknown users and items.


def test_recommend_returns_k_per_user_and_excludes_everything_bought(served_dir):
    directory, _, data, catalog = served_dir
    served = load_served_model(directory)
    bought = _bought(data, catalog, served.user_ids)

    recommendations = served.recommend(served.user_ids, k=10)

    assert list(recommendations.columns) == ["userId", "rank", "itemId", "score"]
    assert (recommendations.groupby("userId").size() == 10).all()
    assert recommendations["userId"].nunique() == len(served.user_ids)
    assert recommendations.attrs["unknown_users"] == 0
    assert not any(
        item in bought[user] for user, item in zip(recommendations["userId"], recommendations["itemId"], strict=True)
    )
    assert set(recommendations["itemId"]) <= set(served.assortment)
    for _, ranked in recommendations.groupby("userId"):
        assert list(ranked["rank"]) == list(range(1, 11))
        assert ranked["score"].is_monotonic_decreasing


def test_recommendations_are_the_top_scores_of_the_assortment(served_dir):
    directory, _, data, catalog = served_dir
    served = load_served_model(directory)
    user = served.user_ids[5]
    bought = _bought(data, catalog, served.user_ids)[user]

    top = served.recommend([user], k=5)
    everything = served.score(pd.DataFrame({"userId": user, "itemId": served.assortment}))

    expected = everything[~everything["itemId"].isin(bought)].nlargest(5, "score")
    assert list(top["itemId"]) == list(expected["itemId"])
    np.testing.assert_allclose(top["score"], expected["score"], rtol=1e-5)


def test_unknown_users_are_counted_and_get_the_history_free_ranking(served_dir):
    directory, model, _, _ = served_dir
    served = load_served_model(directory)

    recommendations = served.recommend(["stranger-1", served.user_ids[0], "stranger-2"], k=5)

    assert recommendations.attrs["unknown_users"] == 2
    assert list(recommendations["userId"].unique()) == ["stranger-1", served.user_ids[0], "stranger-2"]
    first = recommendations[recommendations["userId"] == "stranger-1"]
    second = recommendations[recommendations["userId"] == "stranger-2"]
    assert list(first["itemId"]) == list(second["itemId"])
    # An empty history pools to zero: what is left is the head's item bias, the market's popularity.
    bias = model.head.item_bias.weight[:, 0].detach().numpy()
    rows = served.catalog.rows(served.assortment)
    expected = np.asarray(served.assortment)[np.argsort(-bias[rows], kind="stable")[:5]]
    assert list(first["itemId"]) == list(expected)


def test_extra_history_shapes_an_unknown_users_recommendations_and_is_excluded(served_dir):
    directory, _, _, _ = served_dir
    served = load_served_model(directory)
    plain = served.recommend(["newcomer"], k=10)
    recent = pd.DataFrame({"userId": "newcomer", "itemId": list(plain["itemId"][:3]) + ["NOT-IN-CATALOG"]})

    shaped = served.recommend(["newcomer"], k=10, extra_history=recent)

    assert list(shaped["itemId"]) != list(plain["itemId"])
    assert not set(shaped["itemId"]) & set(recent["itemId"])
    assert len(shaped) == 10 and shaped.attrs["unknown_users"] == 1


def test_extra_history_of_a_known_user_adds_to_what_is_known(served_dir):
    directory, _, _, _ = served_dir
    served = load_served_model(directory)
    user = served.user_ids[3]
    before = served.recommend([user], k=10)
    recent = pd.DataFrame(
        {"userId": [user, user], "itemId": list(before["itemId"][:2]), "date": ["2030-01-02", "2030-01-01"]}
    )

    after = served.recommend([user], k=10, extra_history=recent)

    assert not set(after["itemId"]) & set(recent["itemId"])
    assert after.attrs["unknown_users"] == 0


def test_score_gives_unknown_items_nan_and_unknown_users_the_history_free_score(served_dir):
    directory, model, _, _ = served_dir
    served = load_served_model(directory)
    item = served.assortment[0]
    pairs = pd.DataFrame(
        {
            "userId": [served.user_ids[0], "stranger", "stranger", served.user_ids[0]],
            "itemId": [item, item, "NO-SUCH-ITEM", "NO-SUCH-ITEM"],
        }
    )

    scored = served.score(pairs)

    assert list(scored.columns) == ["userId", "itemId", "score"]
    assert list(scored["userId"]) == list(pairs["userId"]) and list(scored["itemId"]) == list(pairs["itemId"])
    assert np.isfinite(scored["score"][:2]).all() and scored["score"][2:].isna().all()
    assert scored.attrs == {"unknown_users": 1, "unknown_items": 1}
    bias = float(model.head.item_bias.weight[served.catalog.rows([item])[0], 0].detach())
    assert scored["score"][1] == pytest.approx(bias, abs=1e-6)


def test_score_as_of_test_refuses_extra_history_and_pairs_without_columns(served_dir):
    directory, _, _, _ = served_dir
    served = load_served_model(directory)

    with pytest.raises(ValueError, match="no extra history"):
        served.score(
            pd.DataFrame({"userId": ["a"], "itemId": ["b"]}),
            pd.DataFrame({"userId": ["a"], "itemId": ["b"]}),
            as_of="test",
        )
    with pytest.raises(ValueError, match="missing \\['itemId'\\]"):
        served.score(pd.DataFrame({"userId": ["a"]}))


# --- The command lines.


def test_recommend_cli_writes_tsv_and_one_summary_line(served_dir, tmp_path):
    directory, _, _, _ = served_dir
    served = load_served_model(directory)
    users = tmp_path / "users.tsv"
    users.write_text("userId\n" + "\n".join([served.user_ids[0], "ghost", served.user_ids[1]]) + "\n")
    out = tmp_path / "recs.tsv"

    summary = recommend_cli.main(["--model", str(directory), "--users", str(users), "--k", "4", "--out", str(out)])

    written = pd.read_csv(out, sep="\t", dtype={"userId": str, "itemId": str})
    assert list(written.columns) == ["userId", "rank", "itemId", "score"]
    assert len(written) == 12 and list(written["userId"].unique()) == [served.user_ids[0], "ghost", served.user_ids[1]]
    assert "3 users, of which 1 unknown" in summary and "\n" not in summary
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_recommend_cli_history_changes_an_unknown_users_recommendations(served_dir, tmp_path):
    directory, _, _, _ = served_dir
    users = tmp_path / "users.tsv"
    users.write_text("userId\nnewcomer\n")
    plain, shaped = tmp_path / "plain.tsv", tmp_path / "shaped.tsv"
    recommend_cli.main(["--model", str(directory), "--users", str(users), "--out", str(plain)])
    first = pd.read_csv(plain, sep="\t", dtype=str)["itemId"]
    history = tmp_path / "recent.txt"
    history.write_text(
        "userId itemId rate date\n"
        + "".join(f"newcomer {item} 5.0 2024-01-0{day}\n" for day, item in enumerate(first[:3], start=1))
    )

    summary = recommend_cli.main(
        ["--model", str(directory), "--users", str(users), "--history", str(history), "--out", str(shaped)]
    )

    second = pd.read_csv(shaped, sep="\t", dtype=str)["itemId"]
    assert list(second) != list(first) and not set(second) & set(first[:3])
    assert "1 users, of which 1 unknown" in summary


def test_recommend_cli_all_covers_every_known_user(served_dir, tmp_path):
    directory, _, data, _ = served_dir
    out = tmp_path / "recs.tsv"

    summary = recommend_cli.main(["--model", str(directory), "--all", "--k", "3", "--out", str(out)])

    written = pd.read_csv(out, sep="\t", dtype=str)
    assert written["userId"].nunique() == data.split.num_users and len(written) == 3 * data.split.num_users
    assert f"{data.split.num_users} users, of which 0 unknown" in summary


def test_score_cli_keeps_the_columns_and_counts_unknowns(served_dir, tmp_path):
    directory, _, _, _ = served_dir
    served = load_served_model(directory)
    candidates = tmp_path / "candidates.tsv"
    candidates.write_text(
        "userId\titemId\tnote\n"
        f"{served.user_ids[0]}\t{served.assortment[0]}\ta\n"
        f"ghost\t{served.assortment[1]}\tb\n"
        f"ghost\tNO-SUCH-ITEM\tc\n"
    )
    out = tmp_path / "scored.tsv"

    summary = score_cli.main(["--model", str(directory), "--candidates", str(candidates), "--out", str(out)])

    written = pd.read_csv(out, sep="\t", dtype={"userId": str, "itemId": str, "note": str})
    assert list(written.columns) == ["userId", "itemId", "note", "score"]
    assert list(written["note"]) == ["a", "b", "c"]
    assert written["score"][:2].notna().all() and written["score"].isna().tolist()[2]
    assert "1 unknown users, 1 unknown items" in summary


@pytest.mark.parametrize(
    ("module", "arguments", "expected"),
    [
        ("clients.recommend", ["--model", "{absent}", "--all", "--out", "{out}"], "no such directory"),
        (
            "clients.recommend",
            ["--model", "{model}", "--users", "{bad_users}", "--out", "{out}"],
            "lacks the column userId",
        ),
        ("clients.recommend", ["--model", "{model}", "--all", "--k", "0", "--out", "{out}"], "--k must be at least 1"),
        (
            "clients.recommend",
            ["--model", "{model}", "--out", "{out}"],
            "one of the arguments --users --all is required",
        ),
        (
            "clients.recommend",
            ["--model", "{model}", "--all", "--catalog", "{other_catalog}", "--out", "{out}"],
            "another catalog",
        ),
        (
            "clients.score",
            ["--model", "{model}", "--candidates", "{ragged}", "--out", "{out}"],
            "line 3: found 3 fields",
        ),
        ("clients.score", ["--model", "{model}", "--candidates", "{absent}", "--out", "{out}"], "cannot be read"),
        (
            "clients.recommend",
            ["--model", "{model}", "--all", "--history", "{bad_date}", "--out", "{out}"],
            "line 2: date 'yesterday' is not an ISO 8601 date",
        ),
    ],
)
def test_cli_errors_are_one_line_without_traceback(served_dir, tmp_path, module, arguments, expected):
    directory, _, _, catalog = served_dir
    (tmp_path / "bad_users.tsv").write_text("user\nx\n")
    (tmp_path / "ragged.tsv").write_text("userId\titemId\nu\ti\nu\ti\textra\n")
    (tmp_path / "bad_date.txt").write_text("userId itemId rate date\nu i 5.0 yesterday\n")
    Catalog(catalog.item_ids[1:], catalog.overflow_rows).save(tmp_path / "other.txt")
    paths = {
        "absent": tmp_path / "absent",
        "out": tmp_path / "out.tsv",
        "model": directory,
        "bad_users": tmp_path / "bad_users.tsv",
        "ragged": tmp_path / "ragged.tsv",
        "other_catalog": tmp_path / "other.txt",
        "bad_date": tmp_path / "bad_date.txt",
    }

    result = _cli(module, *[argument.format(**paths) for argument in arguments])

    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert expected in result.stderr and result.stderr.startswith("error: ")
    assert not (tmp_path / "out.tsv").exists()


def test_cli_help_shows_the_defaults():
    result = _cli("clients.recommend", "--help")

    assert result.returncode == 0
    assert "(default: 10)" in result.stdout and "--history FILE" in result.stdout


# --- Baselines leave a served model per market, at the round results.json reports.


@pytest.mark.parametrize("method", ["local", "pooled"])
def test_baselines_write_each_markets_model_at_its_best_validation_round(tmp_path, method):
    catalog = SOURCE.catalog()
    settings = BaselineSettings(3, TrainConfig(), 16, HISTORY_LENGTH, False, 0, models_dir=tmp_path)
    run = run_local if method == "local" else run_pooled

    curves = run(SOURCE, catalog, settings, lambda _: None)

    for market, curve in curves.items():
        best = max(curve[1:], key=lambda point: point["val-ndcg"])
        manifest = json.loads((tmp_path / method / market / "manifest.json").read_text())
        assert manifest["method"] == method and manifest["round"] == best["round"]
        assert manifest["metrics"]["test-ndcg"] == best["test-ndcg"]
        assert manifest["metrics"]["val-ndcg"] == best["val-ndcg"]
        assert set(manifest["metrics"]) == set(best) - {"round", "epsilon", "delta"}
        served = load_served_model(tmp_path / method / market, catalog)
        split = load_split(SOURCE, market, catalog)
        data = MarketTensors.from_split(split, HISTORY_LENGTH)
        assert _served_test_ndcg(served, data, catalog) == pytest.approx(best["test-ndcg"], abs=1e-6)
        assert served.model.config.num_users == split.num_users


# --- The acceptance timing on the largest real market.


@pytest.mark.skipif(not XMARKET_DIR.is_dir(), reason="the XMarket sample is not at ../shared/data")
def test_recommend_all_and_score_100k_pairs_on_the_largest_real_market_cost_a_few_starts_of_the_command(tmp_path):
    source = MarketSource(str(XMARKET_DIR), 6, 0)
    catalog = source.catalog()
    split = load_split(source, "ca", catalog)
    data = MarketTensors.from_split(split, 50)
    torch.manual_seed(0)
    model = SplitRecommender(ModelConfig(catalog.size, split.num_users))  # default sizes: 128-d, 50 items
    write_served_model(
        tmp_path / "ca",
        model,
        data,
        catalog,
        _manifest(market="ca"),
        user_ids=market_user_ids(source.interactions("ca")),
    )
    rng = np.random.default_rng(0)
    users = load_served_model(tmp_path / "ca").user_ids
    pd.DataFrame({"userId": rng.choice(users, 100_000), "itemId": rng.choice(catalog.item_ids, 100_000)}).to_csv(
        tmp_path / "pairs.tsv", sep="\t", index=False
    )

    # The reference, timed in the same run: the same command only starting (imports, parsing) and exiting.
    started = time.perf_counter()
    _cli("clients.recommend", "--help")
    start_seconds = time.perf_counter() - started
    started = time.perf_counter()
    recommended = _cli("clients.recommend", "--model", str(tmp_path / "ca"), "--all", "--out", str(tmp_path / "r.tsv"))
    recommend_seconds = time.perf_counter() - started
    started = time.perf_counter()
    scored = _cli(
        "clients.score",
        "--model",
        str(tmp_path / "ca"),
        "--candidates",
        str(tmp_path / "pairs.tsv"),
        "--out",
        str(tmp_path / "s.tsv"),
    )
    score_seconds = time.perf_counter() - started

    print(
        f"ca: recommend --all {recommend_seconds:.2f} s ({recommended.stdout.strip()}); "
        f"score 100k pairs {score_seconds:.2f} s ({scored.stdout.strip()}); a bare start {start_seconds:.2f} s"
    )
    assert recommended.returncode == 0 and scored.returncode == 0, recommended.stderr + scored.stderr
    assert f"{split.num_users} users, of which 0 unknown" in recommended.stdout
    # Serving a whole market or 100k pairs costs a few starts of the command, not minutes.
    assert recommend_seconds < 5 * start_seconds and score_seconds < 5 * start_seconds


def _region_context(state_dir: Path) -> Context:
    """A deployed region's context as a fresh SuperNode process starts it: empty state."""
    return Context(
        run_id=1,
        node_id=7,
        node_config={"market": MARKET, "state-dir": str(state_dir)},
        state=RecordDict(),
        run_config={},
    )


def test_a_restarted_region_still_serves_the_best_round_of_the_whole_training(tmp_path):
    # Prepare: before the restart, round 2 is the best so far (validation 0.5).
    model, data, catalog = _trained()
    best_state = {name: value.clone() for name, value in model.state_dict().items()}
    metrics = {key: 0.1 for key in KEPT_METRICS} | {"val-ndcg": 0.5}
    remember_if_best(_region_context(tmp_path), model, MARKET, 2, metrics, "training-1")
    with torch.no_grad():
        for value in model.parameters():
            value.add_(1.0)  # the model after the restart differs from the kept one

    # Execute: the restarted SuperNode evaluates a worse round 3 and then writes its served model.
    restarted = _region_context(tmp_path)
    remember_if_best(restarted, model, MARKET, 3, metrics | {"val-ndcg": 0.4}, "training-1")
    write_best_model(restarted, model, data, catalog, get_method("fedper"), "training-1")

    # Assert: the served model is round 2's, parameters and manifest both, in the training's own folder.
    served = load_served_model(tmp_path / "models" / "training-1", catalog)
    assert served.manifest["round"] == 2 and served.manifest["metrics"]["val-ndcg"] == 0.5
    assert served.manifest["training-id"] == "training-1"
    for name, value in best_state.items():
        assert torch.equal(served.model.state_dict()[name], value), name


def test_an_unreadable_best_round_file_is_reported_and_the_region_keeps_training(tmp_path, caplog):
    # Prepare: the saved best round is damaged.
    model, _, _ = _trained()
    (tmp_path / f"{MARKET}{BEST_FILE_SUFFIX}").write_bytes(b"not a torch file")

    # Execute
    context = _region_context(tmp_path)
    remember_if_best(context, model, MARKET, 1, {key: 0.2 for key in KEPT_METRICS}, "training-1")

    # Assert: the warning names the file, and this round becomes the best, saved again.
    assert "unreadable" in caplog.text and BEST_FILE_SUFFIX in caplog.text
    assert int(context.state[BEST_INFO_KEY]["round"]) == 1
    assert torch.load(tmp_path / f"{MARKET}{BEST_FILE_SUFFIX}", weights_only=True)["info"]["round"] == 1


def test_a_simulated_market_keeps_its_best_round_in_a_file_with_zero_rows_left_out(tmp_path):
    # Prepare: a simulated market (no "market" in its node config) with a models-dir; half the
    # item table's rows are zero, as fedals' factors are outside a market's assortment.
    model, data, catalog = _trained()
    table = "encoder.item_embedding.weight"
    with torch.no_grad():
        model.encoder.item_embedding.weight[1::2] = 0.0  # the odd rows and the second half: over half zero
        model.encoder.item_embedding.weight[len(model.encoder.item_embedding.weight) // 2 :] = 0.0
    best_state = {name: value.clone() for name, value in model.state_dict().items()}
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": 0, "num-partitions": 1},
        state=RecordDict(),
        run_config={"models-dir": str(tmp_path), "method": "fedper"},
    )
    metrics = {key: 0.1 for key in KEPT_METRICS} | {"val-ndcg": 0.5}

    # Execute: round 2 is the best; then the final round's served model is written.
    remember_if_best(context, model, MARKET, 2, metrics, "training-1")
    best_path = tmp_path / "fedper" / f"{MARKET}{BEST_FILE_SUFFIX}"
    kept_in_memory = "best-model" in context.state
    saved = torch.load(best_path, weights_only=True)["state"]
    with torch.no_grad():
        for value in model.parameters():
            value.add_(1.0)
    write_best_model(context, model, data, catalog, get_method("fedper"), "training-1")

    # Assert: the engine's context held no model, the file stored only the non-zero item rows,
    # the served model is round 2's exactly, and the file is gone once served.
    assert not kept_in_memory
    nonzero = int(best_state[table].any(dim=1).sum())
    assert saved[table].shape[0] == nonzero < len(best_state[table]) // 2
    served = load_served_model(tmp_path / "fedper" / MARKET, catalog)
    assert served.manifest["round"] == 2
    for name, value in best_state.items():
        assert torch.equal(served.model.state_dict()[name], value), name
    assert not best_path.exists()
