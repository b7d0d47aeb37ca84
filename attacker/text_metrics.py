"""Scoring a text reconstruction against the truth: token accuracy, exact-sentence rate.

Pure numpy/scipy. Only the evaluator calls these; attacks never see the truth.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

IdsLike = np.ndarray | torch.Tensor


def _ids(x: IdsLike) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return a[None] if a.ndim == 1 else a


def _pair(pred: IdsLike, true: IdsLike) -> tuple[np.ndarray, np.ndarray]:
    p, t = _ids(pred), _ids(true)
    if p.shape != t.shape or p.ndim != 2 or p.size == 0:
        raise ValueError(f"need equal, non-empty (T,) or (B, T) token ids: {p.shape} vs {t.shape}")
    return p, t


def token_accuracy(pred: IdsLike, true: IdsLike) -> float:
    """Fraction of positions whose predicted token id equals the true one."""
    p, t = _pair(pred, true)
    return float(np.mean(p == t))


def exact_sentence_rate(pred: IdsLike, true: IdsLike) -> float:
    """Fraction of sentences (rows) recovered with every token right."""
    p, t = _pair(pred, true)
    return float(np.mean(np.all(p == t, axis=1)))


def match_sentences(pred: IdsLike, true: IdsLike) -> np.ndarray:
    """Pair reconstructed with true sentences by most matching tokens (optimal assignment).

    A batch gradient is a sum over sentences, so they come back in no particular order.

    Returns:
        perm (B,) int64 such that pred[perm[j]] is matched with true[j].
    """
    p, t = _pair(pred, true)
    matches = (t[:, None, :] == p[None, :, :]).sum(axis=-1)  # (B_true, B_pred)
    rows, cols = linear_sum_assignment(-matches)
    perm = np.empty(t.shape[0], dtype=np.int64)
    perm[rows] = cols
    return perm


def score_text(pred: IdsLike, true: IdsLike) -> dict[str, Any]:
    """Score a reconstructed sentence batch after optimal matching.

    Args:
        pred, true: (B, T) (or (T,)) int token ids.

    Returns:
        token_accuracy, exact_sentence_rate, per-sentence `sentence_accuracy` (truth
        order), permutation (list of int).
    """
    p, t = _pair(pred, true)
    perm = match_sentences(p, t)
    p = p[perm]
    return {
        "token_accuracy": token_accuracy(p, t),
        "exact_sentence_rate": exact_sentence_rate(p, t),
        "sentence_accuracy": [float(v) for v in np.mean(p == t, axis=1)],
        "permutation": perm.tolist(),
    }
