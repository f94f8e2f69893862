"""Data sources and pipelines."""
