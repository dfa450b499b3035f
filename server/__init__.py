"""Flower ServerApp: encoder aggregation, per-market metrics and checkpoints."""
