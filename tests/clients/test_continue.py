"""Continue on new data: a training that starts from the published shared part and the markets' saved heads.

A first training (two generated markets, some users not there yet) runs
through the real ServerApp and ClientApp in this process, on a grid that hands
each message to the ClientApp; it publishes its shared part and writes each
market's served model. The continued training reads them through the app
config's ``init-from``.
"""

import argparse
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.join import PUBLISHED_FILE, load_published
from clients.local_model import LOCAL_STATE_KEY, build_local_model
from common.data.catalog import Catalog
from common.data.interactions import read_interactions
from common.data.split import split_market
from common.data.synthetic import SyntheticConfig, write_markets
from common.protocol import CONTINUES_KEY
from common.run_config import RunConfig
from common.serving.query import load_served_model
from server.server_app import initial_arrays, published_arrays, train_config
from simulations import run as harness
from simulations.benchmarks import continue_benchmark
from tests.in_process import in_process_federated, serve
from tests.in_process import run_config as in_process_config

SEED = 0
DIM = 8
SMALL = SyntheticConfig(markets=2, items=400, largest_market_users=240, smallest_market_users=60, seed=SEED)
LATE_USERS = 5  # users of each market that are not in the first training's files
USER_TABLE = "head.user_embedding.weight"

pytestmark = pytest.mark.usefixtures("server_task_identity")


RUN = {"method": "fedper", "user-embeddings": True, "embedding-dim": DIM, "num-server-rounds": 1, "seed": SEED}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A fedper training over two markets without their last users, and the markets' grown files."""
    root = tmp_path_factory.mktemp("continue")
    full = write_markets(SMALL, root / "full")
    before = root / "before"
    before.mkdir()
    for path in full.values():
        frame = pd.read_csv(path, dtype=str)
        late = sorted(frame["userId"].unique())[-LATE_USERS:]
        frame[~frame["userId"].isin(late)].to_csv(before / path.name, index=False)
    catalog = Catalog.from_items(item for path in full.values() for item in read_interactions(path)["item"])
    catalog_path = root / "catalog.txt"
    catalog.save(catalog_path)
    models = root / "out" / "models"
    first = in_process_config(
        RUN,
        **{
            "data-dir": str(before),
            "catalog-path": str(catalog_path),
            "out-dir": str(root / "out" / "server"),
            "models-dir": str(models),
        },
    )
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # module scope: before the fixture
    serve(first)
    grown = in_process_config(
        RUN, **{"data-dir": str(root / "full"), "catalog-path": str(catalog_path), "init-from": str(models / "fedper")}
    )
    return {"root": root, "catalog": catalog, "models": models / "fedper", "grown": grown}


def _fresh_and_restored(run_config: dict, partition: int = 1) -> tuple[dict, dict, Context]:
    """The head a market starts with without init-from and with ``run_config``'s; and the context of the latter."""
    heads = []
    for config in ({**run_config, "init-from": ""}, run_config):
        context = Context(
            run_id=9,
            node_id=7,
            node_config={"partition-id": partition, "num-partitions": 2},
            state=RecordDict(),
            run_config=config,
        )
        server = RunConfig.from_run_config(config)
        content = RecordDict({"arrays": initial_arrays(server), "config": train_config(server)})
        model, *_ = build_local_model(Message(content, dst_node_id=7, message_type=MessageType.TRAIN), context)
        heads.append({name: value.clone() for name, value in model.state_dict().items() if name.startswith("head.")})
    return heads[0], heads[1], context


# --- the server -------------------------------------------------------------------------------------------


def test_the_server_starts_from_the_published_shared_arrays(trained, tmp_path):
    # Prepare: the grown files, init-from naming the published file itself (not its directory).
    run_config = {
        **trained["grown"],
        "init-from": str(trained["models"] / PUBLISHED_FILE),
        "out-dir": str(tmp_path / "server"),
        "models-dir": str(tmp_path / "models"),
    }

    # Execute
    grid = serve(run_config)

    # Assert: the first message (round 1's training, which evaluates round 0 too) carries the published arrays,
    # and every message names the training it continues (a deployed region starts from its head of that one).
    published = load_published(trained["models"] / PUBLISHED_FILE)
    first = grid.sent[0].content["arrays"].to_torch_state_dict()
    assert list(first) == list(published.arrays)
    assert all(torch.equal(first[name], published.arrays[name]) for name in published.arrays)
    assert {str(message.content["config"][CONTINUES_KEY]) for message in grid.sent} == {published.training_id}


def test_a_method_that_shares_the_same_arrays_may_start_from_them(trained):
    # fedrep shares what fedper shares (the encoder): the published arrays fit, whatever trained them.
    config = RunConfig.from_run_config({**trained["grown"], "method": "fedrep"})

    arrays, continues = published_arrays(config, trained["catalog"], initial_arrays(config, trained["catalog"]))

    published = load_published(trained["models"] / PUBLISHED_FILE)
    assert all(torch.equal(arrays.to_torch_state_dict()[name], published.arrays[name]) for name in published.arrays)
    assert continues == published.training_id  # sent to every market: a region continues its head of that training


@pytest.mark.parametrize(
    ("overrides", "other_catalog", "named"),
    [
        ({"embedding-dim": 16}, False, "embedding-dim: 8 there, 16 in this run"),
        ({"history-length": 20}, False, "history-length: 50 there, 20 in this run"),
        ({"user-embeddings": False}, False, "user-embeddings: True there, False in this run"),
        ({"method": "fedavg"}, False, "method: fedper shares other arrays than fedavg of this run"),
        ({}, True, "catalog fingerprint: '"),
    ],
)
def test_a_published_file_of_other_settings_is_refused_naming_the_setting(trained, overrides, other_catalog, named):
    # Prepare: the run differs from the published training in one setting, or in its catalog.
    catalog = trained["catalog"]
    if other_catalog:
        catalog = Catalog.from_items([*catalog.item_ids, "P-NEW"])
    config = RunConfig.from_run_config({**trained["grown"], **overrides})

    # Execute / Assert: one ValueError names the file, the setting and both values.
    with pytest.raises(ValueError, match="Cannot start from .*published.pt \\(init-from\\)") as refused:
        published_arrays(config, catalog, initial_arrays(config, catalog))
    assert named in str(refused.value)


# --- a simulated market's head ----------------------------------------------------------------------------


def test_a_simulated_market_restores_its_head_from_its_served_model(trained):
    # Prepare: the served model of m01 after the first training, and the grown file's users.
    served = load_served_model(trained["models"] / "m01")
    saved = served.model.state_dict()
    users = list(
        split_market("m01", read_interactions(trained["root"] / "full" / "m01.csv"), trained["catalog"], SEED).user_ids
    )

    # Execute
    fresh, restored, context = _fresh_and_restored(trained["grown"])

    # Assert: what does not depend on users is the served model's; the user table is carried over by user ID.
    assert LOCAL_STATE_KEY in context.state
    for name in ("head.history_projection.weight", "head.item_bias.weight"):
        assert torch.equal(restored[name], saved[name])
    rows = pd.Index(served.user_ids).get_indexer(users)
    known, late = rows >= 0, rows < 0
    assert late.sum() == LATE_USERS and len(users) == len(served.user_ids) + LATE_USERS
    assert torch.equal(restored[USER_TABLE][torch.as_tensor(known)], saved[USER_TABLE][torch.as_tensor(rows[known])])
    # A user the first training never saw gets the new row a fresh head gives them.
    assert torch.equal(restored[USER_TABLE][torch.as_tensor(late)], fresh[USER_TABLE][torch.as_tensor(late)])
    assert not torch.equal(restored["head.item_bias.weight"], fresh["head.item_bias.weight"])


def test_a_market_without_a_served_model_starts_with_a_new_head_and_a_warning(trained, tmp_path, flower_warnings):
    # Prepare: a directory with the published file but no market's served model.
    shutil.copy(trained["models"] / PUBLISHED_FILE, tmp_path / PUBLISHED_FILE)

    # Execute
    fresh, restored, _ = _fresh_and_restored({**trained["grown"], "init-from": str(tmp_path)})

    # Assert: the seeded head, and a WARNING saying why.
    assert all(torch.equal(restored[name], fresh[name]) for name in fresh)
    why = f"{tmp_path / 'm01'} is not a served model: there is no such directory."
    assert f"Market m01 starts with a new head: {why}" in [record.getMessage() for record in flower_warnings]


def test_under_dp_a_market_never_starts_from_a_served_head(trained, flower_warnings):
    # A served model may be trained without DP; under DP it must not shape what the market sends.
    run_config = {**trained["grown"], "dp-epsilon": 8.0, "dp-accountant": "rdp"}

    fresh, restored, _ = _fresh_and_restored(run_config)

    assert all(torch.equal(restored[name], fresh[name]) for name in fresh)
    assert any("Market m01 trains under DP: it starts with a new head" in r.getMessage() for r in flower_warnings)


def test_a_deployed_region_does_not_read_init_from(trained, tmp_path):
    # A region takes no path from the server: init-from is the ServerApp's alone there.
    market_file = tmp_path / "m01.csv"
    shutil.copy(trained["root"] / "full" / "m01.csv", market_file)
    catalog_path = str(trained["root"] / "catalog.txt")
    context = Context(
        run_id=9,
        node_id=7,
        state=RecordDict(),
        run_config=trained["grown"],
        node_config={"market": "m01", "data-path": str(market_file), "catalog-path": catalog_path},
    )
    server = RunConfig.from_run_config(trained["grown"])
    content = RecordDict({"arrays": initial_arrays(server), "config": train_config(server)})

    build_local_model(Message(content, dst_node_id=7, message_type=MessageType.TRAIN), context)

    assert LOCAL_STATE_KEY not in context.state


# --- the benchmark ----------------------------------------------------------------------------------------


def test_the_benchmark_continues_on_data_that_excludes_what_is_evaluated(tmp_path, monkeypatch):
    # Prepare: three small generated markets; the federated runs in this process (a SuperLink costs ~30 s each).
    data = tmp_path / "data"
    write_markets(
        SyntheticConfig(markets=3, items=400, largest_market_users=200, smallest_market_users=60, seed=SEED), data
    )
    monkeypatch.setattr(harness, "run_federated", in_process_federated)
    out = tmp_path / "out"

    # Execute
    report = continue_benchmark.run(
        _benchmark_args(
            ["--data-dir", str(data), "--num-server-rounds", "2", "--embedding-dim", str(DIM), "--out", str(out)]
        )
    )

    # Assert: the files, and a report of the documented shape.
    assert {"catalog.txt", "continue.json", "continue.md", "data-before"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "continue.json").read_text()) == json.loads(json.dumps(report))
    assert report["rounds"] == {"before": 2, "scratch": 2, "continue": 1}
    assert set(report["markets"]) == {"m00", "m01", "m02"}
    assert report["macro"]["difference"] == pytest.approx(report["macro"]["continue"] - report["macro"]["scratch"])
    assert "| **macro** |" in (out / "continue.md").read_text()
    # Continue started from the first training: its round 0 is far above scratch's random start.
    assert report["macro"]["start"] > report["macro_per_round"]["scratch"]["0"] + 0.02
    # The data before it grew: no validation or test interaction of the full split, nor the latest 20% by date.
    catalog = Catalog.load(out / "catalog.txt")
    for path in sorted(data.iterdir()):
        market = path.stem
        full = read_interactions(path)
        before = read_interactions(out / "data-before" / f"{market}.txt")
        split = split_market(market, full, catalog, SEED)
        users = np.asarray(split.user_ids)
        evaluated = {
            (users[u], catalog.item_ids[c[0]])
            for s in (split.valid, split.test)
            for u, c in zip(s.users, s.candidates, strict=True)
        }
        by_date = full.sort_values(["date", "position"], kind="stable")
        last = by_date.iloc[len(full) - round(0.2 * len(full)) :]
        latest = set(zip(last["user"], last["item"], strict=True))
        kept = set(zip(before["user"], before["item"], strict=True))
        assert kept and not kept & evaluated and not kept & latest
        assert kept == set(zip(full["user"], full["item"], strict=True)) - evaluated - latest
        assert report["interactions"][market]["before"] == len(kept)
        # Dates and ratings are written as they were read.
        merged = before.merge(full, on=["user", "item"], suffixes=("", "-full"))
        assert (merged["date"] == merged["date-full"]).all() and (merged["rating"] == merged["rating-full"]).all()


def _benchmark_args(argv: list[str]):
    parser = argparse.ArgumentParser()
    continue_benchmark.add_arguments(parser)
    return parser.parse_args(argv)
