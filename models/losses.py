"""The three MemKD losses: L = L_KD + lambda1 * L_NM + lambda2 * L_Orth."""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor


def distillation_loss(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    """L_KD: 1 - cosine similarity between student and teacher at every position, per layer.

    Averaged over batch and positions, so its scale does not depend on batch or feature-map size,
    and summed over layers as in STPM and RD4AD, whose learning rates were tuned for that sum.
    """
    return sum((1 - F.cosine_similarity(s.float(), t.float(), dim=1)).mean() for s, t in zip(student, teacher))


def normality_embedding_loss(rebuilt: Tensor, target: Tensor) -> Tensor:
    """L_NM: squared distance between L2-normalised rebuilt and target features [B, C, H, W].

    Averaged over positions; lies in [0, 4] (0 when every direction is rebuilt exactly).
    """
    diff = F.normalize(rebuilt.float(), dim=1) - F.normalize(target.float(), dim=1)
    return diff.pow(2).sum(1).mean()


def orthogonality_loss(keys: Tensor, values: Tensor) -> Tensor:
    """L_Orth: mean squared cosine between every key and every value.

    Zero exactly when keys and values are orthogonal; squaring means anti-correlated pairs are
    penalised like correlated ones (a signed sum would reward them).
    """
    cosines = F.normalize(keys, dim=1) @ F.normalize(values, dim=1).t()
    return cosines.pow(2).mean()
