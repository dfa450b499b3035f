"""A market that joins late: the server publishes its shared part, the market fits a head on it alone.

The federation is two generated markets trained through the real ServerApp and
ClientApp in one process (a grid that hands each message to the ClientApp);
the third market, absent from that training, joins with ``clients.join``.
"""

import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.client_app import app as client_app
from clients.join import (
    build_model,
    check_state_dir,
    join_market,
    load_published,
    subsample_training_users,
)
from clients.join import (
    main as join_main,
)
from clients.local_model import LOCAL_STATE_KEY
from clients.state_store import MarketState, MarketStateStore
from common.data.catalog import Catalog
from common.data.interactions import read_interactions
from common.data.split import split_market
from common.data.synthetic import SyntheticConfig, write_markets
from common.neural.train import MarketTensors, evaluate
from common.protocol import CONTINUES_KEY
from common.serving.query import load_served_model
from server.history import PUBLISHED_FILE
from tests.in_process import run_config as in_process_config
from tests.in_process import serve
from tests.paths import REPO

SEED = 0
DIM = 8
ROUNDS = 2
JOINER = "m02"

pytestmark = pytest.mark.usefixtures("server_task_identity")


RUN = {"method": "fedper", "embedding-dim": DIM, "num-server-rounds": ROUNDS, "seed": SEED}


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> dict:
    """Three generated markets and the company catalog; m00 and m01 train with the ServerApp, m02 stays out."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    root = tmp_path_factory.mktemp("federation")
    paths = write_markets(
        SyntheticConfig(markets=3, items=400, largest_market_users=240, smallest_market_users=60, seed=SEED),
        root / "all",
    )
    catalog = Catalog.from_items(item for path in paths.values() for item in read_interactions(path)["item"])
    catalog_path = root / "catalog.txt"
    catalog.save(catalog_path)
    trained = root / "federation"
    trained.mkdir()
    for market in ("m00", "m01"):
        shutil.copy(paths[market], trained / paths[market].name)
    run_config = in_process_config(
        RUN,
        **{
            "data-dir": str(trained),
            "catalog-path": str(catalog_path),
            "out-dir": str(root / "out" / "server"),
            "models-dir": str(root / "out" / "models"),
        },
    )
    serve(run_config, 2, run_id=41)
    return {
        "root": root,
        "paths": paths,
        "catalog": catalog,
        "catalog_path": catalog_path,
        "run_config": run_config,
        "models": root / "out" / "models" / "fedper",
        "server_out": root / "out" / "server",
    }


def _split(federation: dict, market: str = JOINER):
    return split_market(market, read_interactions(federation["paths"][market]), federation["catalog"], SEED)


def _join(federation: dict, out: Path, *extra: str) -> str:
    return join_main(
        [
            "--model-dir",
            str(federation["models"]),
            "--data",
            str(federation["paths"][JOINER]),
            "--catalog",
            str(federation["catalog_path"]),
            "--out",
            str(out),
            "--join-epochs",
            "3",
            *extra,
        ]
    )


# --- publishing -------------------------------------------------------------------------------------------


def test_the_server_publishes_the_final_shared_arrays_when_the_training_ends(federation):
    # Execute
    published = load_published(federation["server_out"] / PUBLISHED_FILE)

    # Assert: what a joiner checks, and the arrays of the last round (the final checkpoint's).
    assert (published.method, published.embedding_dim, published.user_embeddings) == ("fedper", DIM, False)
    assert published.history_length == federation["run_config"]["history-length"]
    assert published.catalog_fingerprint == federation["catalog"].fingerprint()
    assert (published.training_id, published.round) == ("41", ROUNDS)
    checkpoint = torch.load(federation["server_out"] / "checkpoint.pt", weights_only=True)
    assert checkpoint["round"] == ROUNDS
    assert set(published.arrays) == set(checkpoint["arrays"]) and all(
        n.startswith("encoder.") for n in published.arrays
    )
    for name, array in published.arrays.items():
        assert torch.equal(array, checkpoint["arrays"][name])
    # In simulation the same file lies beside the markets' models, OUT/models/<method>/published.pt.
    copy = federation["models"] / PUBLISHED_FILE
    assert copy.read_bytes() == (federation["server_out"] / PUBLISHED_FILE).read_bytes()


def test_a_server_stopped_before_publishing_publishes_when_resumed_after_the_last_round(federation, tmp_path):
    # Prepare: the finished training's out-dir without its published.pt.
    out = tmp_path / "server"
    shutil.copytree(federation["server_out"], out)
    (out / PUBLISHED_FILE).unlink()
    run_config = {**federation["run_config"], "out-dir": str(out), "models-dir": "", "resume": True}

    # Execute: nothing is left to train, so no market is asked anything.
    serve(run_config, 2, run_id=42)

    # Assert
    assert (out / PUBLISHED_FILE).read_bytes() == (federation["server_out"] / PUBLISHED_FILE).read_bytes()


def test_a_file_that_is_not_a_published_shared_part_is_refused_by_name(tmp_path):
    path = tmp_path / "published.pt"
    torch.save({"arrays": {}}, path)

    with pytest.raises(ValueError, match=f"{path} is not a published shared part"):
        load_published(path)
    with pytest.raises(ValueError, match="does not exist"):
        load_published(tmp_path / "missing.pt")


# --- joining ----------------------------------------------------------------------------------------------


def test_a_market_absent_from_the_training_joins_with_a_head_of_its_own(federation, tmp_path):
    # Execute: the head alone, the encoder frozen throughout.
    summary = _join(federation, tmp_path / "joined", "--fine-tune-epochs", "0")

    # Assert: a served model of the joining market, its metrics those of the model it holds.
    served = load_served_model(tmp_path / "joined", federation["catalog"])
    split = _split(federation)
    assert served.market == JOINER and served.user_ids == sorted(served.user_ids)
    assert served.manifest["method"] == "join-fedper" and 1 <= served.manifest["round"] <= 3
    assert served.manifest["epsilon"] is None and served.manifest["delta"] is None
    data = MarketTensors.from_split(split, served.history_length)
    for prefix, result in (("val", evaluate(served.model, data)), ("test", evaluate(served.model, data, on_test=True))):
        metrics = served.manifest["metrics"]
        assert metrics[f"{prefix}-ndcg"] == result.ndcg and metrics[f"{prefix}-hr"] == result.hit_rate
        assert metrics[f"{prefix}-full-ndcg"] == result.full_ndcg
        assert metrics[f"{prefix}-full-recall"] == result.full_recall
    # The encoder is the published one, untouched; the head was fitted.
    published = load_published(federation["models"] / PUBLISHED_FILE)
    state = served.model.state_dict()
    for name, array in published.arrays.items():
        assert torch.equal(state[name], array)
    fresh = build_model(published, split, federation["catalog"], SEED).state_dict()
    assert not torch.equal(state["head.item_bias.weight"], fresh["head.item_bias.weight"])
    assert not torch.equal(state["head.history_projection.weight"], fresh["head.history_projection.weight"])
    # One summary line with the market, users, best epoch, val/test NDCG@10 and seconds.
    assert "\n" not in summary
    assert summary.startswith(f"{JOINER}: joined fedper training 41 (round {ROUNDS}) with {split.num_users} of ")
    assert f"best epoch {served.manifest['round']} of 3" in summary
    assert f"val NDCG@10 {served.manifest['metrics']['val-ndcg']:.4f}" in summary and " s -> " in summary


def test_another_catalog_is_refused_in_one_line_without_a_traceback(federation, tmp_path):
    # Prepare: the catalog of the two trained markets only.
    paths = federation["paths"]
    other = Catalog.from_items(item for m in ("m00", "m01") for item in read_interactions(paths[m])["item"])
    other.save(tmp_path / "other.txt")

    # Execute
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "clients.join",
            "--model-dir",
            str(federation["models"]),
            "--data",
            str(paths[JOINER]),
            "--catalog",
            str(tmp_path / "other.txt"),
            "--out",
            str(tmp_path / "joined"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )

    # Assert
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"error: {tmp_path / 'other.txt'} is not the catalog training 41")
    assert not (tmp_path / "joined").exists()


def test_a_fraction_of_the_users_trains_and_every_user_is_evaluated(federation, tmp_path):
    # Execute
    _join(federation, tmp_path / "joined", "--fraction", "0.25", "--fine-tune-epochs", "1")

    # Assert
    served = load_served_model(tmp_path / "joined")
    split = _split(federation)
    trained_users = len(np.unique(split.train_users))
    assert served.manifest["joined"]["train-users"] == math.ceil(0.25 * trained_users)
    data = MarketTensors.from_split(split, served.history_length)
    assert served.manifest["metrics"]["test-ndcg"] == evaluate(served.model, data, on_test=True).ndcg
    assert len(served.user_ids) == split.num_users


def test_fine_tuning_after_the_head_never_keeps_a_model_worse_on_validation(federation):
    # Prepare: the head phase is seeded per epoch, so both joins share its first two epochs.
    published = load_published(federation["models"] / PUBLISHED_FILE)
    split = _split(federation)

    # Execute
    head_only = join_market(published, split, federation["catalog"], epochs=2, fine_tune_epochs=0)
    fine_tuned = join_market(published, split, federation["catalog"], epochs=2, fine_tune_epochs=2)

    # Assert: the best of four epochs is at least the best of their first two; an
    # encoder kept from the fine-tuning is the market's own, the published one otherwise.
    assert fine_tuned.valid.ndcg >= head_only.valid.ndcg and fine_tuned.epochs == 4
    encoder_untouched = all(
        torch.equal(fine_tuned.model.state_dict()[name], array) for name, array in published.arrays.items()
    )
    assert encoder_untouched == (fine_tuned.best_epoch <= 2)


def test_subsampling_keeps_the_evaluation_and_whole_users(federation):
    split = _split(federation)
    users = np.unique(split.train_users)

    # Execute
    half = subsample_training_users(split, 0.5, seed=3)

    # Assert: ceil(half) of the users, each with all their training interactions; evaluation unchanged.
    kept = np.unique(half.train_users)
    assert len(kept) == math.ceil(0.5 * len(users)) and set(kept) <= set(users)
    for user in kept:
        assert np.array_equal(half.train_items[half.train_users == user], split.train_items[split.train_users == user])
    assert half.valid is split.valid and half.test is split.test
    assert half.num_users == split.num_users and half.market_items is split.market_items
    assert np.array_equal(subsample_training_users(split, 0.5, seed=3).train_users, half.train_users)
    assert not np.array_equal(np.unique(subsample_training_users(split, 0.5, seed=4).train_users), kept)
    assert subsample_training_users(split, 1.0, seed=3) is split
    assert len(np.unique(subsample_training_users(split, 1e-9, seed=3).train_users)) == 1
    for fraction in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"in \(0, 1\]"):
            subsample_training_users(split, fraction, seed=3)


# --- the next training ------------------------------------------------------------------------------------


def test_the_clientapp_of_the_region_restores_the_joined_head_in_the_next_training(federation, tmp_path):
    # Prepare: the region joins into its state-dir and serves the joined model from there. Without
    # fine-tuning the served encoder is the published one, so the next training must evaluate exactly as it.
    state_dir = tmp_path / "state"
    summary = _join(
        federation, state_dir / "model", "--state-dir", str(state_dir), "--market", JOINER, "--fine-tune-epochs", "0"
    )
    saved = MarketStateStore(state_dir, JOINER).load()
    served = load_served_model(state_dir / "model")

    # Execute: the region's SuperNode gets the next training's first message, the published arrays.
    published = load_published(federation["models"] / PUBLISHED_FILE)
    node = {
        "market": JOINER,
        "data-path": str(federation["paths"][JOINER]),
        "catalog-path": str(federation["catalog_path"]),
        "state-dir": str(state_dir),
    }
    context = Context(run_id=2, node_id=9, node_config=node, state=RecordDict(), run_config=in_process_config(RUN))
    message = Message(
        RecordDict(
            {
                "arrays": ArrayRecord(published.arrays),
                # the next training continues the one the region joined (the server's init-from)
                "config": ConfigRecord({"server-round": 1, "training-id": "next", CONTINUES_KEY: "41"}),
            }
        ),
        dst_node_id=9,
        message_type=MessageType.EVALUATE,
    )
    reply = client_app(message, context)

    # Assert: the state holds the fitted head, which the ClientApp took: it evaluates exactly as the joined model.
    assert str(state_dir / f"{JOINER}.pt") in summary
    assert saved.training_id == "join-41" and saved.own_arrays is None and not saved.private
    assert set(saved.head) == {"head.history_projection.weight", "head.item_bias.weight"}
    restored = context.state[LOCAL_STATE_KEY].to_torch_state_dict()
    for name, value in saved.head.items():
        assert torch.equal(restored[name], value) and torch.equal(served.model.state_dict()[name], value)
    metrics = reply.content["metrics"]
    for key in ("val-ndcg", "val-hr", "test-ndcg", "test-hr"):
        assert metrics[key] == pytest.approx(served.manifest["metrics"][key], abs=1e-12)


def test_a_state_dir_of_a_market_under_dp_or_with_a_trained_head_is_refused(tmp_path):
    # A region that trains under DP keeps a ledger: a head fitted without DP must not seed its training.
    (tmp_path / f"{JOINER}.ledger.json").write_text("{}")
    with pytest.raises(ValueError, match="trains under DP"):
        check_state_dir(tmp_path, JOINER)

    # A head from a training is not replaced silently; one from an earlier join is.
    other = tmp_path / "other"
    store = MarketStateStore(other, JOINER)
    store.save(MarketState("7", 3, {"head.item_bias.weight": torch.zeros(2, 1)}))
    with pytest.raises(ValueError, match="trained in training 7 .*move it away"):
        check_state_dir(other, JOINER)
    store.save(MarketState("join-7", 0, {"head.item_bias.weight": torch.zeros(2, 1)}))
    assert check_state_dir(other, JOINER).path == store.path
