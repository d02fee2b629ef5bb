"""Analysis of weight deltas: how alike the task vectors of several fine-tunes are.

Importing this package is cheap: torch loads on first use of a function.
"""
from __future__ import annotations

from .similarity import SimilarityError, task_vector_similarity

__all__ = ["SimilarityError", "task_vector_similarity"]
