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

import torch
import torch.nn.functional as F
from torch import Tensor

from models import registry
from models.memory import unit_and_length, unit_backward

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


# The memory's two losses are written with their gradients by hand (torch.autograd.Function): they
# run for every memory in every step, and on a GPU each operator is a kernel launch; autograd's
# chains for them take 15 and 9 operators, these 12 and 7. tests/test_models.py checks both
# against autograd through the plain formulas.


class _NormalityEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rebuilt: Tensor, unit_target: Tensor) -> Tensor:
        unit, length = unit_and_length(rebuilt, -1)
        diff = (unit - unit_target).view(-1)
        ctx.save_for_backward(unit, length, diff)
        ctx.positions = len(rebuilt)
        return torch.dot(diff, diff) / ctx.positions

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        unit, length, diff = ctx.saved_tensors
        grad_unit = (diff * (grad * (2.0 / ctx.positions))).view(unit.shape)
        return unit_backward(grad_unit, unit, length, -1), None


def normality_embedding_loss(rebuilt: Tensor, unit_target: Tensor) -> Tensor:
    """L_NM: squared distance between the L2-normalised rebuilt features and the target features,
    rows [S, C] of feature vectors, the target's given as unit rows (exemplar targets are fixed:
    normalised once): mean over rows of ||n(rebuilt) - target||^2.

    Lies in [0, 4] (0 when every direction is rebuilt exactly).
    """
    return _NormalityEmbedding.apply(rebuilt, unit_target)


class _Orthogonality(torch.autograd.Function):
    @staticmethod
    def forward(ctx, unit_keys: Tensor, unit_values: Tensor) -> Tensor:
        with torch.autocast(unit_keys.device.type, enabled=False):  # the memory's math stays float32
            cosines = unit_keys @ unit_values.t()
        ctx.save_for_backward(unit_keys, unit_values, cosines)
        flat = cosines.view(-1)
        return torch.dot(flat, flat) / flat.numel()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        unit_keys, unit_values, cosines = ctx.saved_tensors
        grad_cosines = cosines * (grad * (2.0 / cosines.numel()))
        return grad_cosines @ unit_values, grad_cosines.t() @ unit_keys


def orthogonality_loss(unit_keys: Tensor, unit_values: Tensor) -> Tensor:
    """L_Orth: mean squared cosine between every key and every value, given as unit rows [L, C]
    (normalised once per step, with the read: models.memory.MemoryRead): one product.

    Zero exactly when keys and values are orthogonal; squaring means anti-correlated pairs are
    penalised like correlated ones (a signed sum would reward them).
    """
    return _Orthogonality.apply(unit_keys, unit_values)
