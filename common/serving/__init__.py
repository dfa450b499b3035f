"""What a region serves: the served-model format on disk, the query object, published shared parts, tables.

:mod:`~common.serving.format` writes a served-model directory; :mod:`~common.serving.query`
loads it and answers recommendations and scores, once :mod:`~common.serving.checks` has
checked its files against each other and its catalog; :mod:`~common.serving.published` is the
shared part a training publishes; :mod:`~common.serving.sparse_state` stores mostly-zero tables
by their rows; :mod:`~common.serving.tables` reads and writes the tables the commands exchange,
and :mod:`~common.serving.streaming` the same a chunk at a time; :mod:`~common.serving.batching`
sizes the batches of users ranked at once and ranks them.
"""

__all__ = ["batching", "checks", "format", "published", "query", "sparse_state", "streaming", "tables"]
