"""The neural split recommender: a shared item encoder, a market-local head, their training and blending."""

__all__ = ["blend", "model", "train"]
