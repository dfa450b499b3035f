"""A learned ranker per market over fedals' candidates (``rerank``): features, ranker, served model."""
