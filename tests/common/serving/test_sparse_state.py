"""Mostly-zero tables stored by their rows: the round trip is exact and the store is small."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.serving.sparse_state import SPARSE_SUFFIX, compact_state, expand_state


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(2, 40), width=st.integers(1, 6), filled=st.sets(st.integers(0, 39)), seed=st.integers(0, 99))
def test_compact_then_expand_gives_back_every_table_exactly(rows, width, filled, seed):
    # Prepare: a table with an arbitrary set of non-zero rows, a vector and a dense table.
    generator = torch.Generator().manual_seed(seed)
    table = torch.zeros(rows, width)
    for row in (row for row in filled if row < rows):
        table[row] = torch.rand(width, generator=generator) + 0.1
    state = {
        "table": table,
        "bias": torch.rand(rows, generator=generator),
        "dense": torch.rand(3, 2, generator=generator) + 0.1,
    }

    # Execute
    compact = compact_state(state)
    back = expand_state(compact)

    # Assert
    assert back.keys() == state.keys()
    for name, value in state.items():
        assert torch.equal(back[name], value), name
    stored_rows = sum(1 for row in filled if row < rows)
    assert (SPARSE_SUFFIX in "".join(compact)) == (stored_rows < rows // 2)


def test_a_table_of_a_few_rows_in_a_million_is_stored_by_those_rows():
    # Prepare: 3 of 1,000,000 rows are non-zero.
    table = torch.zeros(1_000_000, 4)
    table[[5, 70, 999_999]] = 1.0

    # Execute
    compact = compact_state({"items": table})

    # Assert: three rows of values and the length plus three indices.
    assert compact["items"].shape == (3, 4)
    assert compact["items" + SPARSE_SUFFIX].tolist() == [1_000_000, 5, 70, 999_999]


def test_row_indices_outside_the_table_are_refused():
    compact = {"items": torch.ones(2, 3), "items" + SPARSE_SUFFIX: torch.tensor([4, 1, 4])}

    with pytest.raises(ValueError, match="row indices"):
        expand_state(compact)


def test_expanding_into_a_models_tables_fills_them_in_place():
    # Prepare: a stored table of 6 rows with rows 1 and 4 set, and a model table holding other values.
    table = torch.zeros(6, 2)
    table[[1, 4]] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = {"items": torch.full((6, 2), 9.0), "bias": torch.zeros(3)}
    storage = target["items"].data_ptr()

    # Execute
    state = expand_state(compact_state({"items": table, "bias": torch.ones(3)}), into=target)

    # Assert: the model's own tensor now equals the table; the dense entry comes back as stored.
    assert state["items"].data_ptr() == storage and torch.equal(target["items"], table)
    assert torch.equal(state["bias"], torch.ones(3))


def test_expanding_into_a_table_of_another_shape_is_refused():
    stored = compact_state({"items": torch.zeros(6, 2)})

    with pytest.raises(ValueError, match="the model's is"):
        expand_state(stored, into={"items": torch.zeros(5, 2)})
