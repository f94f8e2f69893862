"""Evaluation: reconstruction and generation metrics."""
