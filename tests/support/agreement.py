"""The agreement rule for two ways of computing the same images' vectors (a faster path against a reference):
each fast vector's nearest reference vector is its own image's, and closer than a tenth of the median distance
between different images. A plain cosine bar is too weak: with random weights different images already sit at
cosine ~0.95."""

from __future__ import annotations

import numpy as np


def assert_vectors_agree(fast: np.ndarray, reference: np.ndarray) -> None:
    count = len(reference)
    between = np.linalg.norm(reference[:, None, :] - reference[None, :, :], axis=2)
    median_between = np.median(between[~np.eye(count, dtype=bool)])
    across = np.linalg.norm(fast[:, None, :] - reference[None, :, :], axis=2)
    assert (across.argmin(axis=1) == np.arange(count)).all(), "each vector's nearest is its own image's"
    own = across.diagonal()
    assert own.max() < median_between / 10, (own.max(), median_between)
