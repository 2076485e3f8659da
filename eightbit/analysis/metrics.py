"""Accuracy metrics comparing an int8 model with its float reference."""

from __future__ import annotations

import numpy as np


def topk_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> int:
    """How many rows have their label among the k largest logits."""
    top = np.argsort(-logits, axis=1)[:, :k]
    return int((top == labels[:, None]).any(axis=1).sum())


def top1_agreement(reference: np.ndarray, candidate: np.ndarray) -> int:
    """How many rows have the same arg-max in both."""
    return int((reference.argmax(1) == candidate.argmax(1)).sum())


def mean_cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean cosine similarity between corresponding rows."""
    a = reference.reshape(len(reference), -1).astype(np.float64)
    b = candidate.reshape(len(candidate), -1).astype(np.float64)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean((a * b).sum(1) / np.maximum(denom, 1e-30)))
