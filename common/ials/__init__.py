"""fedals: federated implicit alternating least squares, from the maths to the wire.

- :mod:`~common.ials.core`: the loss, hyper-parameters and the types (interactions, item
  factors, item statistics);
- :mod:`~common.ials.kernels`: batched Cholesky solves over ragged segments;
- :mod:`~common.ials.steps`: the exact half-steps a market and the server run;
- :mod:`~common.ials.reference`: pooled iALS and the federated protocol in one process, side by side;
- :mod:`~common.ials.wire`: every array and key a market and the server exchange, and their checks;
- :mod:`~common.ials.model`: the market's data view and the factors as the project's split recommender;
- :mod:`~common.ials.private`: the minimum-buyers rule and the market-private item step;
- :mod:`~common.ials.dp`: DP-fedals, the release under user-level DP;
- :mod:`~common.ials.transfer`: a market's private refit on the shared item factors.
"""

__all__ = ["core", "dp", "kernels", "model", "private", "reference", "steps", "transfer", "wire"]
