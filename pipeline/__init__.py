"""Segmentation pipeline: DVC stages that download, prepare, train, evaluate and serve."""

__version__ = "0.1.0"
