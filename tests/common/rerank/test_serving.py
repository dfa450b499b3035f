"""Serving a rerank directory: recommend and score through the retriever, the features and the ranker.

The directory is built as the harness builds it, on the smallest generated market with a random
model as fedals' retriever and a small ranker (see test_served.py); the commands run in this
process.
"""

import dataclasses
import hashlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from clients import recommend as recommend_cli
from clients import score as score_cli
from common.data.markets import MarketSource, load_split
from common.neural.model import ModelConfig, SplitRecommender
from common.neural.train import MarketTensors
from common.rerank.features import FEATURE_NAMES, FeatureTables, interaction_days, market_contexts, serving_context
from common.rerank.query import RerankServer
from common.rerank.ranker import RankerConfig, fit_ranker
from common.rerank.served import (
    RANKER_FILE,
    RERANK_MANIFEST,
    SERVING_FEATURES_FILE,
    candidate_scores,
    load_rerank_model,
    write_ranker,
    write_retriever,
)
from common.serving.format import market_user_ids

SOURCE = MarketSource("", 3, 0)
HISTORY = 5
MARKET = "m02"  # the smallest generated market
CONFIG = RankerConfig(max_trees=20, stopping_rounds=5, min_child_samples=20)


def _write(directory, fallback: bool):
    """A rerank directory of MARKET as the harness writes one: retriever, ranker (or fedals' order), tables."""
    catalog = SOURCE.catalog()
    split = load_split(SOURCE, MARKET, catalog)
    data = MarketTensors.from_split(split, HISTORY)
    torch.manual_seed(0)
    model = SplitRecommender(ModelConfig(catalog.size, split.num_users, 8, HISTORY, user_embeddings=True))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=0.3)
    model.eval()
    interactions = SOURCE.interactions(MARKET)
    days = interaction_days(split, interactions, catalog, with_test=True)
    valid_context, test_context = market_contexts(split, *days[:2])
    norms = np.linspace(0.0, 1.0, len(split.market_items))
    valid_features = FeatureTables.build(valid_context, split.market_items, norms).list_features(
        split.valid.users, split.valid.candidates, candidate_scores(model, data)
    )
    fit = fit_ranker(valid_features, CONFIG)
    if fallback:
        fit = dataclasses.replace(fit, model=None, importance={})
    manifest = {"method": "fedals", "market": MARKET, "round": 1, "metrics": {}, "epsilon": None, "delta": None}
    write_retriever(directory, model, data, catalog, manifest, market_user_ids(interactions))
    write_ranker(
        directory,
        fit,
        FeatureTables.build(test_context, split.market_items, norms),
        split.test.users,
        split.test.candidates,
        {"method": "rerank", "market": MARKET},
        serving_tables=FeatureTables.build(serving_context(split, *days), split.market_items, norms),
    )
    return split


@pytest.fixture(scope="module")
def rerank_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("rerank") / MARKET
    split = _write(directory, fallback=False)
    return directory, split


@pytest.fixture(scope="module")
def server(rerank_dir):
    return RerankServer(load_rerank_model(rerank_dir[0]))


def _brute_force(server: RerankServer, user: str, rows: np.ndarray, retrieval: np.ndarray) -> np.ndarray:
    """The ranker's scores of one known user's list, from the served pieces one at a time."""
    model = server.model
    features = model.serving_tables.list_features(server.user_index([user]), rows[None, :], retrieval[None, :])[0]
    if model.booster is None:
        return retrieval
    chosen = features[:, [FEATURE_NAMES.index(name) for name in model.fit.features]]
    return model.booster.predict(chosen) + model.fit.base_scale * retrieval


def _bought(split, user_ids: list[str], catalog_ids: list[str]) -> dict[str, set[str]]:
    users = np.concatenate([split.train_users, split.valid.users, split.test.users])
    rows = np.concatenate([split.train_items, split.valid.candidates[:, 0], split.test.candidates[:, 0]])
    bought: dict[str, set[str]] = {}
    for user, row in zip(users.tolist(), rows.tolist(), strict=True):
        bought.setdefault(user_ids[user], set()).add(catalog_ids[row])
    return bought


def test_the_serving_tables_know_every_interaction_and_the_test_tables_all_but_test(rerank_dir, server):
    # Prepare
    _, split = rerank_dir
    per_stage = [np.bincount(u, minlength=split.num_users) for u in (split.train_users, split.valid.users)]
    tested = np.bincount(split.test.users, minlength=split.num_users)

    # Execute
    serving = np.diff(server.model.serving_tables.user_offsets)
    at_test = np.diff(server.model.tables.user_offsets)

    # Assert
    np.testing.assert_array_equal(at_test, per_stage[0] + per_stage[1])
    np.testing.assert_array_equal(serving, per_stage[0] + per_stage[1] + tested)
    # Each user's latest item at serving is their test item.
    last = server.model.serving_tables.user_columns[server.model.serving_tables.user_offsets[1:][tested > 0] - 1]
    order = np.argsort(split.test.users)
    expected = np.searchsorted(split.market_items, split.test.candidates[order, 0])
    np.testing.assert_array_equal(last, expected)


def test_recommend_is_a_brute_force_rerank_of_the_retrieved_candidates(rerank_dir, server):
    # Prepare
    _, split = rerank_dir
    assert server.model.booster is not None, "the fixture's ranker fell back: this test would test fedals' order"
    users = server.user_ids[:12]
    k, retrieve = 5, 30
    catalog_ids = server.retriever.catalog.item_ids

    # Execute
    recommended = server.recommend(users, k, retrieve=retrieve, batch_users=5)
    retrieved = server.retriever.recommend(users, retrieve)

    # Assert
    bought = _bought(split, server.user_ids, catalog_ids)
    reordered = 0
    for user in users:
        mine = retrieved[retrieved["userId"] == user]
        rows = server.retriever.catalog.rows(mine["itemId"])
        scores = _brute_force(server, user, rows, mine["score"].to_numpy())
        best = np.argsort(-scores, kind="stable")[:k]
        got = recommended[recommended["userId"] == user]
        assert list(got["itemId"]) == list(mine["itemId"].to_numpy()[best])
        # float32 retrieval scores of batches of other sizes differ in their last bits.
        np.testing.assert_allclose(got["score"], scores[best], rtol=1e-6)
        assert list(got["rank"]) == list(range(1, k + 1))
        assert not set(got["itemId"]) & bought[user]
        reordered += list(got["itemId"]) != list(mine["itemId"][:k])
    assert reordered > 0  # the ranker changes some user's order: the comparison above is not fedals' order twice


def test_a_fallback_market_recommends_the_retrievers_top_k(tmp_path):
    # Prepare
    directory = tmp_path / MARKET
    _write(directory, fallback=True)
    server = RerankServer(load_rerank_model(directory))
    users = server.user_ids[:8]

    # Execute
    recommended = server.recommend(users, 4, retrieve=10)
    retriever = server.retriever.recommend(users, 4)

    # Assert
    assert not (directory / RANKER_FILE).exists()
    pd.testing.assert_frame_equal(recommended.reset_index(drop=True), retriever.reset_index(drop=True))


def test_score_ranks_each_users_pairs_as_one_list(server):
    # Prepare: two users, three items each, an item outside the catalog and one the market does not sell.
    users = server.user_ids[:2]
    sold = server.assortment[:3]
    catalog = server.retriever.catalog
    unsold = next(item for row, item in enumerate(catalog.item_ids) if server.tables.columns_of([row])[0] < 0)
    pairs = pd.DataFrame(
        {
            "userId": [users[0]] * 3 + [users[1]] * 3 + [users[0], users[1]],
            "itemId": sold + sold[::-1] + ["no-such-item", unsold],
        }
    )

    # Execute
    scored = server.score(pairs)
    shuffled = server.score(pairs.iloc[[5, 0, 3, 1, 4, 2]].reset_index(drop=True))

    # Assert
    for user, rows in ((users[0], slice(0, 3)), (users[1], slice(3, 6))):
        mine = pairs.iloc[rows]
        retrieval = server.retriever.score(mine)["score"].to_numpy()
        expected = _brute_force(server, user, catalog.rows(mine["itemId"]), retrieval)
        # The retriever's float32 scores of other sets of pairs differ in their last bits.
        np.testing.assert_allclose(scored["score"].to_numpy()[rows], expected, atol=1e-6)
    assert scored["score"].iloc[6:].isna().all()
    # A list is a set: the order the pairs come in does not change their scores.
    np.testing.assert_allclose(shuffled["score"], scored["score"].to_numpy()[[5, 0, 3, 1, 4, 2]], atol=1e-6)


def test_the_commands_serve_a_rerank_directory(rerank_dir, server, tmp_path, capsys):
    # Prepare
    directory, _ = rerank_dir
    users = server.user_ids[:6]
    (tmp_path / "users.tsv").write_text("userId\n" + "\n".join(users) + "\n")
    pairs = pd.DataFrame(
        {"userId": [users[0]] * 3 + [users[1]] * 2, "itemId": server.assortment[:3] + server.assortment[:2]}
    )
    pairs.to_csv(tmp_path / "pairs.tsv", sep="\t", index=False)

    # Execute
    recommend_cli.run_cli(
        recommend_cli.main,
        [
            "--model",
            str(directory),
            "--users",
            str(tmp_path / "users.tsv"),
            "--k",
            "3",
            "--retrieve",
            "20",
            "--out",
            str(tmp_path / "recs.tsv"),
        ],
    )
    score_cli.run_cli(
        score_cli.main,
        ["--model", str(directory), "--candidates", str(tmp_path / "pairs.tsv"), "--out", str(tmp_path / "scored.tsv")],
    )

    # Assert
    summary = capsys.readouterr().out
    assert "reranked from the retriever's top 20" in summary
    written = pd.read_csv(tmp_path / "recs.tsv", sep="\t", dtype={"userId": str, "itemId": str})
    expected = server.recommend(users, 3, retrieve=20)
    assert list(written.columns) == ["userId", "rank", "itemId", "score"]
    assert list(written["itemId"]) == list(expected["itemId"])
    np.testing.assert_allclose(written["score"], expected["score"], rtol=1e-6)
    scored = pd.read_csv(tmp_path / "scored.tsv", sep="\t", dtype={"userId": str, "itemId": str})
    np.testing.assert_allclose(scored["score"], server.score(pairs)["score"], rtol=1e-6)


def _corrupt(directory, case: str) -> str:
    """Damage a copy of a rerank directory; the message its refusal must hold."""
    manifest_path = directory / RERANK_MANIFEST
    manifest = json.loads(manifest_path.read_text())
    ranker = directory / RANKER_FILE
    if case == "truncated ranker":
        ranker.write_bytes(ranker.read_bytes()[: len(ranker.read_bytes()) // 2])
        return "bytes, its manifest says"
    if case == "same-size garbage ranker":
        ranker.write_bytes(b"x" * ranker.stat().st_size)
        return "SHA-256 differs"
    if case == "missing ranker":
        ranker.unlink()
        return f"has no {RANKER_FILE}"
    if case == "other feature names":
        text = ranker.read_text().replace("co-sum", "co-total")
        ranker.write_text(text)
        manifest.update(
            {"ranker-bytes": len(text.encode()), "ranker-sha256": hashlib.sha256(text.encode()).hexdigest()}
        )
        manifest_path.write_text(json.dumps(manifest))
        return "reads the features"
    if case == "crafted ranker, its digest rewritten":
        # One tree's child index changed: LightGBM's parser aborts the whole process on it
        text = ranker.read_text()
        start = text.index("left_child=")
        end = text.index("\n", start)
        text = text[:start] + text[start:end].replace("-", "-1", 1) + text[end:]
        ranker.write_text(text)
        manifest.update(
            {"ranker-bytes": len(text.encode()), "ranker-sha256": hashlib.sha256(text.encode()).hexdigest()}
        )
        manifest_path.write_text(json.dumps(manifest))
        return "LightGBM cannot read"
    if case == "garbage serving tables":
        (directory / SERVING_FEATURES_FILE).write_bytes(b"PK\x03\x04 not a zip")
        return f"unusable {SERVING_FEATURES_FILE}"
    if case == "missing serving tables":
        (directory / SERVING_FEATURES_FILE).unlink()
        return f"has no {SERVING_FEATURES_FILE}"
    if case == "inconsistent serving tables":
        with np.load(directory / SERVING_FEATURES_FILE) as arrays:
            tables = dict(arrays)
        tables["user_columns"] = tables["user_columns"] + len(tables["items"])
        np.savez(directory / SERVING_FEATURES_FILE, **tables)
        return "not columns of the assortment"
    if case == "neither manifest":
        manifest_path.unlink()
        return "neither manifest.json (a served model) nor rerank.json"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "truncated ranker",
        "same-size garbage ranker",
        "missing ranker",
        "other feature names",
        "crafted ranker, its digest rewritten",
        "garbage serving tables",
        "missing serving tables",
        "inconsistent serving tables",
        "neither manifest",
    ],
)
def test_a_damaged_rerank_directory_is_refused_in_one_line(rerank_dir, tmp_path, capsys, case):
    # Prepare
    directory = tmp_path / MARKET
    shutil.copytree(rerank_dir[0], directory)
    expected = _corrupt(directory, case)
    (tmp_path / "users.tsv").write_text("userId\nnobody\n")

    # Execute
    with pytest.raises(SystemExit) as exited:
        recommend_cli.run_cli(
            recommend_cli.main,
            ["--model", str(directory), "--users", str(tmp_path / "users.tsv"), "--out", str(tmp_path / "recs.tsv")],
        )

    # Assert
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert expected in err
    assert not (tmp_path / "recs.tsv").exists()


def test_an_unknown_users_history_shapes_the_features_and_is_excluded(server):
    # Prepare: a user the market does not know, with two items of the assortment given at query time.
    given = server.assortment[:2]
    history = pd.DataFrame({"userId": ["newcomer"] * 2, "itemId": given})

    # Execute
    tables = server.user_tables(["newcomer", server.user_ids[0]], server.recent_history(history))
    recommended = server.recommend(["newcomer"], 5, history, retrieve=20)

    # Assert: the newcomer's items are the two given (no latest day: their dates are not read);
    # the known user's are the stored ones.
    rows = server.retriever.catalog.rows(given)
    np.testing.assert_array_equal(tables.user_columns[: tables.user_offsets[1]], server.tables.columns_of(rows))
    assert np.isnan(tables.user_day[0])
    stored = server.tables.user_columns[server.tables.user_offsets[0] : server.tables.user_offsets[1]]
    np.testing.assert_array_equal(tables.user_columns[tables.user_offsets[1] :], stored)
    assert len(recommended) == 5 and not set(recommended["itemId"]) & set(given)
    assert recommended.attrs["unknown_users"] == 1


def test_score_refuses_a_user_whose_pairs_span_two_chunks(rerank_dir, server, tmp_path, capsys):
    # Prepare: user A, then B, then A again, read two pairs at a time.
    directory, _ = rerank_dir
    first, second = server.user_ids[:2]
    items = server.assortment[:3]
    pd.DataFrame({"userId": [first, second, first], "itemId": items}).to_csv(
        tmp_path / "pairs.tsv", sep="\t", index=False
    )
    arguments = ["--model", str(directory), "--candidates", str(tmp_path / "pairs.tsv")]

    # Execute
    with pytest.raises(SystemExit) as exited:
        score_cli.run_cli(score_cli.main, [*arguments, "--chunk-pairs", "2", "--out", str(tmp_path / "split.tsv")])
    err = capsys.readouterr().err
    score_cli.run_cli(score_cli.main, [*arguments, "--chunk-pairs", "3", "--out", str(tmp_path / "whole.tsv")])

    # Assert
    assert exited.value.code == 2 and err.count("\n") == 1
    assert f"User {first}'s pairs are in two chunks of 2 pairs" in err
    assert not (tmp_path / "split.tsv").exists() and (tmp_path / "whole.tsv").exists()
