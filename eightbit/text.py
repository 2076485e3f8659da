"""Sentence encoders: the pooling wrapper that makes a BERT-like encoder a sentence-embedding model, tokenised
batches, and the embedding comparisons used to judge a quantized encoder.  transformers is not imported here: the
tokenizer is whatever object the caller passes.  The offline MiniLM loader is in `eightbit.demos.zoo`, the
movie-review sentences and the sentiment probe in `eightbit.demos.reviews`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class SentenceEncoder(nn.Module):
    """Mean-pool a BERT-like encoder's ``last_hidden_state`` over real tokens, then L2-normalise.

    Identical to sentence-transformers' ``Pooling(mean)`` + ``Normalize``, so padding never changes a sentence's
    embedding. Pure tensor arithmetic (no branching on values), so ``torch.export`` captures it with dynamic
    batch and sequence dims.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        # clamp keeps an all-padding row finite (0 / 1e-9 = 0) instead of NaN, as sentence-transformers does.
        mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(mean, p=2, dim=1)


def token_batches(
    tokenizer, texts: Sequence[str], *, batch_size: int = 32, max_length: int = 128
) -> list[dict[str, torch.Tensor]]:
    """Tokenize ``texts`` in order into batches of ``{"input_ids", "attention_mask"}`` (int64, ``[B, T]``).

    Each batch is padded to its own longest sentence (not to ``max_length``), which is what a serving system
    does and keeps fp32 runs fast; sentences longer than ``max_length`` tokens are truncated. token_type_ids is
    dropped: single-sentence BERT inputs are all zeros, which the model defaults to.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        enc = tokenizer(chunk, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
        batches.append({key: enc[key].to(torch.int64) for key in ("input_ids", "attention_mask")})
    return batches


def embed(fn: Callable[..., torch.Tensor], batches: Sequence[dict[str, torch.Tensor]]) -> np.ndarray:
    """Run ``fn(**batch)`` on every batch under ``torch.no_grad`` and stack the outputs as float32 ``[N, D]``.

    ``fn`` may be an eager module, an exported program's module, or any runtime wrapper returning a tensor or
    an array.
    """
    if not batches:
        raise ValueError("embed needs at least one batch")
    with torch.no_grad():
        outs = [torch.as_tensor(fn(**batch)).detach().cpu().float().numpy() for batch in batches]
    return np.concatenate(outs, axis=0)


def cosine_stats(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Row-wise cosine similarity between two ``[N, D]`` embedding arrays: ``{"mean": ..., "min": ...}``."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or len(a) == 0:
        raise ValueError(f"need two non-empty [N, D] arrays of the same shape, got {a.shape} and {b.shape}")
    # Normalise here rather than trusting the inputs: a quantized encoder's output need not be unit length.
    cos = (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return {"mean": float(cos.mean()), "min": float(cos.min())}
