"""The project's per-example embedding norms: Opacus's own values, and a hand-computed case."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.grad_sample.embedding import compute_embedding_norm_sample

from common.embedding_norms import embedding_norm_sample
from common.model import CatalogEmbedding


@settings(max_examples=40, deadline=None)
@given(
    examples=st.integers(1, 6),
    lookups=st.integers(1, 7),
    rows=st.integers(1, 5),
    width=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_norms_equal_opacus_for_any_lookups(examples, lookups, rows, width, seed):
    # Prepare: few rows, so that lookups of one example often repeat a row.
    generator = torch.Generator().manual_seed(seed)
    layer = CatalogEmbedding(rows, width)
    indices = torch.randint(rows, (examples, lookups), generator=generator)
    backprops = torch.randn(examples, lookups, width, generator=generator, dtype=torch.float64)

    # Execute
    ours = embedding_norm_sample(layer, [indices], backprops)[layer.weight]
    opacus = compute_embedding_norm_sample(layer, [indices], backprops)[layer.weight]

    # Assert
    torch.testing.assert_close(ours, opacus)


def test_norms_add_lookups_of_the_same_row_before_the_norm():
    # Prepare: example 0 looks up row 1 twice, so its two gradients add before the norm.
    layer = CatalogEmbedding(3, 2)
    indices = torch.tensor([[1, 1], [2, 0]])
    backprops = torch.tensor([[[1.0, 0.0], [2.0, 0.0]], [[0.0, 3.0], [0.0, 4.0]]])

    # Execute
    norms = embedding_norm_sample(layer, [indices], backprops)[layer.weight]

    # Assert: example 0 has gradient (3, 0) on row 1; example 1 (0, 3) on row 2 and (0, 4) on row 0.
    torch.testing.assert_close(norms, torch.tensor([3.0, 5.0]))
