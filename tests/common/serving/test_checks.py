"""A served model's files are checked before anything of the sizes they declare is allocated (common.serving.checks)."""

import json
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.data.markets import MarketSource, load_split
from common.neural.model import ModelConfig, SplitRecommender
from common.neural.train import MarketTensors
from common.serving import query
from common.serving.format import MANIFEST, MARKET_FILE, MODEL_FILE, ServedModelError, write_served_model
from common.serving.query import load_served_model
from common.serving.sparse_state import SPARSE_SUFFIX, compact_state

SOURCE = MarketSource("", 2, 0)
MARKET = "m01"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A small served model whose item table is stored by its rows (most rows zero, as fedals' are)."""
    catalog = SOURCE.catalog()
    split = load_split(SOURCE, MARKET, catalog)
    data = MarketTensors.from_split(split, 10)
    torch.manual_seed(0)
    model = SplitRecommender(ModelConfig(catalog.size, split.num_users, 8, 10, False))
    with torch.no_grad():
        model.encoder.item_embedding.weight[4:] = 0.0
    directory = tmp_path_factory.mktemp("served") / MARKET
    manifest = {"method": "fedals", "market": MARKET, "round": 1, "metrics": {}, "epsilon": None, "delta": None}
    write_served_model(directory, model, data, catalog, manifest)
    return directory


def _copy(served, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(served, copy)
    return copy


def _forbid_models(monkeypatch):
    """Fail the test if the loader builds a model: what is refused must be refused before allocating it."""

    def refuse(config):
        raise AssertionError(f"a model of {config} was allocated before the files were checked")

    monkeypatch.setattr(query, "SplitRecommender", refuse)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"num_items": 800_000}, "800000 item rows and .* users, its catalog"),
        ({"num_users": 10**9}, "1000000000 users"),
        ({"dim": 10**8}, "dim 100000000 .* out of range"),
        ({"dim": "8"}, "not all integers"),
        ({"user_embeddings": "yes"}, "user_embeddings is not true or false"),
    ],
)
def test_a_manifest_claiming_other_sizes_is_refused_before_the_model_is_allocated(
    served, tmp_path, monkeypatch, change, problem
):
    # Prepare: the manifest's model config changed (a copy handed to a region).
    copy = _copy(served, tmp_path)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["model_config"].update(change)
    (copy / MANIFEST).write_text(json.dumps(manifest))
    _forbid_models(monkeypatch)

    with pytest.raises(ServedModelError, match=problem):
        load_served_model(copy)


def test_a_stored_table_the_model_does_not_have_is_refused_before_it_is_allocated(served, tmp_path):
    # Prepare: a few bytes declaring a table of 10^9 rows under a name the model does not have.
    copy = _copy(served, tmp_path)
    state = torch.load(copy / MODEL_FILE, weights_only=True)
    state["encoder.huge"] = torch.zeros(1, 8)
    state["encoder.huge" + SPARSE_SUFFIX] = torch.tensor([10**9, 0])
    torch.save(state, copy / MODEL_FILE)

    with pytest.raises(ServedModelError, match="encoder.huge, which the model does not have"):
        load_served_model(copy)


def test_history_offsets_that_do_not_ascend_from_zero_are_refused(served, tmp_path):
    copy = _copy(served, tmp_path)
    market = torch.load(copy / MARKET_FILE, weights_only=True)
    offsets = market["history_offsets"].clone()
    offsets[1], offsets[2] = offsets[2], offsets[1] - 1  # a negative length, the sum unchanged
    market["history_offsets"] = offsets
    torch.save(market, copy / MARKET_FILE)

    with pytest.raises(ServedModelError, match="history offsets that are not 0, then ascending"):
        load_served_model(copy)


def test_the_stored_rows_of_a_table_are_checked_like_its_values():
    compact = compact_state({"t": torch.cat([torch.ones(1, 2), torch.zeros(5, 2)])})
    compact["t" + SPARSE_SUFFIX] = compact["t" + SPARSE_SUFFIX].to(torch.float32)

    with pytest.raises(ValueError, match="not a 1-d int64 tensor"):
        query.expand_state(compact)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.sampled_from([MANIFEST, MODEL_FILE, MARKET_FILE]),
    cut=st.one_of(st.none(), st.floats(0.0, 1.0)),
    flips=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(1, 255)), max_size=8),
)
def test_a_damaged_file_loads_or_is_refused_in_one_sentence_and_never_otherwise(served, tmp_path, name, cut, flips):
    # Prepare: a copy with bytes of one file changed, or the file cut short.
    copy = tmp_path / "fuzzed"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(served, copy)
    data = bytearray((copy / name).read_bytes())
    for where, bits in flips:
        data[int(where * len(data))] ^= bits
    if cut is not None:
        data = data[: int(cut * len(data))]
    (copy / name).write_bytes(bytes(data))

    # Execute / Assert: a ServedModelError or a model that answers; no other exception, no MemoryError.
    try:
        model = load_served_model(copy)
    except ServedModelError as error:
        assert str(error).startswith(("The served model", str(copy))) and "\n" not in str(error)
    else:
        assert len(model.user_ids) == model.model.config.num_users
