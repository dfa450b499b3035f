"""What a served model says about its market's test users, for the tests that compare it with results.json."""

from pathlib import Path

import numpy as np
import pandas as pd

from common.data.catalog import Catalog
from common.data.markets import MarketSource, load_split
from common.data.metrics import ndcg_at_k, rank_of_positive
from common.serving.query import ServedModel, load_served_model


def served_test_ndcg(directory: Path, source: MarketSource, market: str, catalog: Catalog) -> tuple[ServedModel, float]:
    """The served model in ``directory`` and its NDCG@10 on the market's own test candidates, as of test."""
    served = load_served_model(directory, catalog)
    test = load_split(source, market, catalog).test
    pairs = pd.DataFrame(
        {
            "userId": np.repeat(np.asarray(served.user_ids, dtype=object)[test.users], test.candidates.shape[1]),
            "itemId": np.asarray(catalog.item_ids, dtype=object)[test.candidates.ravel()],
        }
    )
    scores = served.score(pairs, as_of="test")["score"].to_numpy().reshape(len(test.users), -1)
    return served, ndcg_at_k(rank_of_positive(scores))
