"""The three MemKD losses: L = L_KD + lambda1 * L_NM + lambda2 * L_Orth.

L_KD comes in the form of the paper each script builds on (``loss.distillation``):

* ``stpm``: STPM's official ``train_val`` (gdwang08/STFPM, main.py): per layer the squared distance
  of channel-normalised student and teacher features, summed over channels, averaged over batch
  and positions; summed over layers.
* ``rd4ad``: RD4AD's official ``loss_fucntion`` (hq-deng/RD4AD, main.py): per layer 1 - cosine
  similarity between each sample's whole flattened feature map of student and teacher, averaged
  over the batch; summed over layers.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor

from models import registry

DistillationLoss = Callable[[Sequence[Tensor], Sequence[Tensor]], Tensor]


def stpm_distillation_loss(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    """STPM's L_KD: sum over layers of mean_{b,h,w} ||n(t) - n(s)||^2, n = L2 normalisation over channels."""
    total = 0
    for s, t in zip(student, teacher):
        diff = F.normalize(t.float(), dim=1) - F.normalize(s.float(), dim=1)
        total = total + diff.pow(2).sum(1).mean()
    return total


def rd4ad_distillation_loss(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    """RD4AD's L_KD: sum over layers of mean_b (1 - cos(flatten(s_b), flatten(t_b)))."""
    total = 0
    for s, t in zip(student, teacher):
        total = total + (1 - F.cosine_similarity(s.float().flatten(1), t.float().flatten(1), dim=1)).mean()
    return total


# The forms behind the config key ``loss.distillation``, in the order of models.registry's names.
DISTILLATION_LOSSES: dict[str, DistillationLoss] = dict(zip(registry.DISTILLATION_LOSSES,
                                                            (stpm_distillation_loss, rd4ad_distillation_loss), strict=True))


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
