"""Flower ClientApp: one market's local training and evaluation."""
