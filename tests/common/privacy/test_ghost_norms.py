"""The project's per-example norms for ghost clipping: Opacus's own values, and hand-computed cases."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.grad_sample.embedding import compute_embedding_norm_sample
from opacus.grad_sample.linear import compute_linear_norm_sample

from common.neural.model import CatalogEmbedding, PositionwiseLinear
from common.privacy.ghost_norms import embedding_norm_sample, positionwise_linear_norm_sample


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


@settings(max_examples=40, deadline=None)
@given(
    examples=st.integers(1, 4),
    positions=st.integers(1, 9),
    features=st.integers(1, 4),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_norms_equal_opacus_whichever_way_they_are_computed(examples, positions, features, bias, seed):
    # Prepare: positions**2 above and below the weight's size, so both ways are taken.
    generator = torch.Generator().manual_seed(seed)
    layer = PositionwiseLinear(features, features, bias=bias)
    activations = torch.randn(examples, positions, features, generator=generator, dtype=torch.float64)
    backprops = torch.randn(examples, positions, features, generator=generator, dtype=torch.float64)

    # Execute
    ours = positionwise_linear_norm_sample(layer, [activations], backprops)
    opacus = compute_linear_norm_sample(layer, [activations], backprops)

    # Assert
    assert set(ours) == set(opacus)
    for parameter in ours:
        torch.testing.assert_close(ours[parameter], opacus[parameter])


def test_linear_norms_of_a_hand_computed_example():
    # Prepare: one example, two positions, a 1x1 weight with bias: gradient = sum_t g_t a_t = 1*2 + 3*4.
    layer = PositionwiseLinear(1, 1)
    activations, backprops = torch.tensor([[[2.0], [4.0]]]), torch.tensor([[[1.0], [3.0]]])

    # Execute
    norms = positionwise_linear_norm_sample(layer, [activations], backprops)

    # Assert: weight gradient 14, bias gradient 1 + 3 = 4.
    torch.testing.assert_close(norms[layer.weight], torch.tensor([14.0]))
    torch.testing.assert_close(norms[layer.bias], torch.tensor([4.0]))
