"""Serving in batches: what is streamed equals what is computed at once, in bounded memory."""

import argparse
import json
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clients import recommend as recommend_cli
from clients import score as score_cli
from common.serving.batching import MAX_USER_BATCH, top_k, users_per_batch
from common.serving.query import load_served_model
from common.serving.streaming import count_rows, write_table_chunks
from common.serving.tables import ServingInputError, read_table, read_table_chunks, write_table
from simulations.benchmarks import command as benchmark_command
from simulations.benchmarks.serving_benchmark import build_model

USERS, ITEMS, DIM = 37, 3000, 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("streaming") / "model"
    build_model(directory, argparse.Namespace(users=USERS, items=ITEMS, dim=DIM, history=5, seed=0))
    return directory


@pytest.fixture(scope="module")
def recent(model_dir, tmp_path_factory) -> Path:
    """A --history file: a known user's newer items, and two users the model does not know."""
    served = load_served_model(model_dir)
    path = tmp_path_factory.mktemp("history") / "recent.txt"
    lines = [f"{served.user_ids[3]} {served.assortment[9]} 5.0 2030-01-02"]
    lines += [f"newcomer {item} 4.0 2030-01-0{day}" for day, item in enumerate(served.assortment[:3], start=1)]
    lines += [f"another {served.assortment[5]} 3.0 2030-01-01"]
    path.write_text("userId itemId rate date\n" + "\n".join(lines) + "\n")
    return path


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype={"userId": str, "itemId": str})


def _assert_same_table(got: pd.DataFrame, expected: pd.DataFrame, rtol: float) -> None:
    """Same rows and text columns; scores equal to ``rtol`` (a product of another batch size sums in another order)."""
    assert list(got.columns) == list(expected.columns) and len(got) == len(expected)
    for column in got.columns:
        if column == "score":
            np.testing.assert_allclose(got[column], expected[column], rtol=rtol, atol=1e-7)
        else:
            assert list(got[column]) == list(expected[column]), column


# --- recommend --all: batches of any size give the result computed at once.


@pytest.mark.parametrize("batch_users", [1, 7, USERS, 1000])
def test_streamed_recommend_all_equals_the_unbatched_result(model_dir, recent, tmp_path, batch_users):
    # Prepare: every user at once, in memory, written as one table.
    served = load_served_model(model_dir)
    history = read_table(recent, ["userId", "itemId"], ["date"])
    users = served.user_ids + list(history["userId"])
    whole = served.recommend(users, 4, extra_history=history, batch_users=len(users))
    write_table(whole, tmp_path / "whole.tsv")
    out = tmp_path / "streamed.tsv"

    # Execute
    summary = recommend_cli.main(
        ["--model", str(model_dir), "--all", "--k", "4", "--history", str(recent), "--out", str(out)]
        + ["--batch-users", str(batch_users)]
    )

    # Assert: the same rows (7 does not divide the 39 users), the summary counts them, the file is private.
    _assert_same_table(_read(out), _read(tmp_path / "whole.tsv"), rtol=1e-5)
    assert len(whole) == 4 * (USERS + 2) and whole["userId"].nunique() == USERS + 2
    assert f"{USERS + 2} users, of which 2 unknown; {4 * (USERS + 2)} recommendations" in summary
    assert f"in batches of {batch_users} ->" in summary and " users/s " in summary
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_recommend_batches_yield_each_batch_with_its_counts(model_dir):
    served = load_served_model(model_dir)
    users = ["stranger", *served.user_ids]

    frames = list(served.recommend_batches(users, 3, batch_users=10))

    assert [frame.attrs["users"] for frame in frames] == [10, 10, 10, 8]
    assert [frame.attrs["unknown_users"] for frame in frames] == [1, 0, 0, 0]
    assert list(pd.concat(frames)["userId"].unique()) == users
    with pytest.raises(ValueError, match="at least 1 user"):
        served.recommend_batches(users, 3, batch_users=0)
    with pytest.raises(ValueError, match="k >= 1"):
        served.recommend_batches(users, 0)


def test_a_users_vector_and_the_item_factors_give_the_models_scores(model_dir):
    # Prepare: what the benchmark's reference ranks with.
    served = load_served_model(model_dir)
    user = served.user_ids[2]
    vectors, bias = served.item_factors
    scored = served.score(pd.DataFrame({"userId": user, "itemId": served.assortment}))["score"].to_numpy()
    recommended = served.recommend([user], 5)

    # Execute
    scores = served.user_vectors([user])[0] @ vectors.T + bias

    # Assert: the product is the score of every item, and of those recommended.
    assert vectors.shape == (len(served.assortment), DIM) and bias.shape == (len(served.assortment),)
    np.testing.assert_allclose(scores, scored, rtol=1e-5, atol=1e-6)
    columns = [served.assortment.index(item) for item in recommended["itemId"]]
    np.testing.assert_allclose(recommended["score"], scores[columns], rtol=1e-5)


# --- Memory: the batch is what the budget holds.


def test_the_batch_is_the_users_whose_scores_fit_the_budget():
    assert users_per_batch(1000, memory=10_000) == 2  # 4,000 bytes a user
    assert users_per_batch(1000, memory=3_999) == 1  # never fewer than one user
    assert users_per_batch(10, memory=1 << 40) == MAX_USER_BATCH
    assert users_per_batch(1_000_064) == 268  # the default 1 GiB over a million-item assortment
    with pytest.raises(ValueError, match="must be positive"):
        users_per_batch(10, memory=0)


def test_recommend_cli_takes_its_batch_from_the_memory_budget(model_dir, tmp_path):
    summary = recommend_cli.main(
        ["--model", str(model_dir), "--all", "--batch-memory", "1", "--out", str(tmp_path / "r.tsv")]
    )

    assert f"in batches of {2**20 // (4 * ITEMS)} ->" in summary  # 87 users of 3,000 items in 1 MiB


def test_top_k_ranks_nan_as_minus_infinity_below_every_finite_number():
    scores = np.array([[np.nan, 1.0, 2.0, -np.inf], [3.0, 0.0, 1.0, 2.0], [np.nan, 5.0, 0.5, 4.0]], dtype=np.float32)

    values, columns = top_k(scores.copy(), 3)

    # Row 0: the NaN (column 0) and -inf (column 3) tie for the third place, as -inf.
    assert columns[0, :2].tolist() == [2, 1] and values[0, 2] == -np.inf and columns[0, 2] in (0, 3)
    # Row 2: the NaN would come first under torch.topk; here it is not among the three best.
    assert columns[2].tolist() == [1, 3, 2] and values[2].tolist() == [5.0, 4.0, 0.5]
    assert columns[1].tolist() == [0, 3, 2] and values[1].tolist() == [3.0, 2.0, 1.0]


# --- score: chunks give the scores computed at once.


@pytest.mark.parametrize("chunk_pairs", [1, 3, 1000])
def test_score_in_chunks_equals_unchunked(model_dir, recent, tmp_path, chunk_pairs):
    # Prepare: pairs of known and unknown users and items, scored at once in memory.
    served = load_served_model(model_dir)
    rng = np.random.default_rng(0)
    users = np.concatenate([np.asarray(served.user_ids, dtype=object), ["newcomer", "ghost"]])
    items = np.concatenate([np.asarray(served.assortment[:50], dtype=object), ["NO-SUCH-ITEM"]])
    pairs = pd.DataFrame({"userId": rng.choice(users, 40), "itemId": rng.choice(items, 40), "note": "n"})
    pairs.loc[[0, 1], "itemId"] = "NO-SUCH-ITEM"
    candidates = tmp_path / "pairs.tsv"
    pairs.to_csv(candidates, sep="\t", index=False)
    history = read_table(recent, ["userId", "itemId"], ["date"])
    whole = pairs.assign(score=served.score(pairs, extra_history=history)["score"].to_numpy())
    write_table(whole, tmp_path / "whole.tsv")
    out = tmp_path / "scored.tsv"

    # Execute
    summary = score_cli.main(
        ["--model", str(model_dir), "--candidates", str(candidates), "--history", str(recent), "--out", str(out)]
        + ["--chunk-pairs", str(chunk_pairs)]
    )

    # Assert: the same table, and the summary counts distinct users and items over all chunks.
    _assert_same_table(_read(out), _read(tmp_path / "whole.tsv"), rtol=1e-6)
    distinct = pairs["userId"].nunique()
    unknown_users = len(set(pairs["userId"]) - set(served.user_ids))
    assert f"40 pairs of {distinct} users, {unknown_users} unknown users, 1 unknown items" in summary
    assert f"({int(whole['score'].isna().sum())} pairs scored NaN)" in summary and " pairs/s " in summary


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".parquet"])
@pytest.mark.parametrize("rows", [1, 2, 100])
def test_reading_in_chunks_gives_the_table_read_at_once(tmp_path, suffix, rows):
    frame = pd.DataFrame({"userId": ["a", "b", "c", "d", "e"], "itemId": ["1", "2", "3", "4", "5"], "x": list("vwxyz")})
    path = tmp_path / f"pairs{suffix}"
    if suffix == ".parquet":
        frame.to_parquet(path)
    else:
        text = frame.to_csv(sep="," if suffix == ".csv" else "\t", index=False)
        path.write_text(text.replace("\nc", "\n\nc"))  # a blank line is skipped

    chunks = list(read_table_chunks(path, ["userId", "itemId"], rows=rows))

    assert [len(chunk) for chunk in chunks] == [min(rows, 5 - start) for start in range(0, 5, rows)]
    pd.testing.assert_frame_equal(
        pd.concat(chunks, ignore_index=True), read_table(path, ["userId", "itemId"]), check_dtype=False
    )
    assert count_rows(path) == (5 if suffix == ".parquet" else 6)  # a text file's blank line counts too


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("userId\titemId\nu\ti\nu\ti\nu\ti\textra\n", "line 4: found 3 fields, expected 2"),
        ("user\titemId\nu\ti\n", "lacks the column userId"),
        ("", "is empty: it has no header line"),
        ("userId userId\nu i\n", "line 1: the header names a column twice"),
    ],
)
def test_reading_in_chunks_reports_what_reading_at_once_reports(tmp_path, content, expected):
    path = tmp_path / "pairs.tsv"
    path.write_text(content)

    with pytest.raises(ServingInputError) as at_once:
        read_table(path, ["userId", "itemId"])
    with pytest.raises(ServingInputError) as in_chunks:
        list(read_table_chunks(path, ["userId", "itemId"], rows=1))

    assert str(in_chunks.value) == str(at_once.value) and expected in str(in_chunks.value)


def test_an_empty_value_and_a_bad_date_are_reported_with_their_line(tmp_path):
    (tmp_path / "pairs.csv").write_text("userId,itemId\nu,i\nu, \n")
    (tmp_path / "recent.txt").write_text("userId itemId date\nu i 2024-01-01\nu j yesterday\n")

    with pytest.raises(ServingInputError, match="line 3: itemId is empty"):
        list(read_table_chunks(tmp_path / "pairs.csv", ["userId", "itemId"], rows=1))
    with pytest.raises(ServingInputError, match="line 3: date 'yesterday' is not an ISO 8601 date"):
        list(read_table_chunks(tmp_path / "recent.txt", ["userId", "itemId"], ["date"], rows=1))


def test_writing_in_chunks_writes_the_table_written_at_once_and_keeps_the_old_file_on_failure(tmp_path):
    frame = pd.DataFrame(
        {"userId": list("abcdef"), "rank": range(1, 7), "score": [0.5, np.nan, 1 / 3, -np.inf, -0.0, 1.5e8]}
    )
    write_table(frame, tmp_path / "whole.tsv")

    write_table_chunks([frame[:1], frame[1:]], tmp_path / "chunks.tsv")
    write_table_chunks([], tmp_path / "empty.tsv", ["userId", "rank"])
    with pytest.raises(ValueError, match="has the columns"):
        write_table_chunks([frame, frame[["userId"]]], tmp_path / "whole.tsv")

    assert (tmp_path / "chunks.tsv").read_text() == (tmp_path / "whole.tsv").read_text()
    assert (tmp_path / "empty.tsv").read_text() == "userId\trank\n"
    assert stat.S_IMODE((tmp_path / "chunks.tsv").stat().st_mode) == 0o600
    assert sorted(path.name for path in tmp_path.iterdir()) == ["chunks.tsv", "empty.tsv", "whole.tsv"]


# --- The benchmark: both rates and the peak memory, in serving.json.


def test_the_serving_benchmark_writes_both_rates_and_the_peak_memory(tmp_path):
    report = benchmark_command.main(
        ["serving", "--users", "30", "--items", "400", "--dim", "8", "--pairs", "200", "--out", str(tmp_path)]
    )

    written = json.loads((tmp_path / "serving.json").read_text())
    assert written["recommend"]["users_per_second"] > 0 and written["reference"]["users_per_second"] > 0
    assert written["ratio_users_per_second"] == pytest.approx(
        written["recommend"]["users_per_second"] / written["reference"]["users_per_second"]
    )
    assert written["recommend"]["peak_rss_bytes"] > 0 and written["score"]["peak_rss_bytes"] > 0
    assert written["score"]["pairs_per_second"] > 0 and written["batch_users"] == MAX_USER_BATCH
    assert "30 users, of which 0 unknown" in written["recommend"]["stdout"]
    assert report["ratio_users_per_second"] == written["ratio_users_per_second"]
    assert sorted(path.name for path in tmp_path.iterdir() if path.suffix in (".json", ".tsv", "")) == ["serving.json"]
