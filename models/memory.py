"""The Normality Recall (NR) memory: L learnable key/value pairs that store normal features."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.registry import FUSION_MODES, MemoryStage


def normalised_entropy(weights: Tensor) -> Tensor:
    """Mean entropy of addressing weights [..., L] divided by log(L): 1 = uniform, 0 = one slot.

    A memory whose weights sit near 1 does not select anything: every query reads the same mix.
    """
    slots = weights.shape[-1]
    if slots == 1:
        return weights.new_zeros(())
    entropy = -(weights * weights.clamp_min(1e-12).log()).sum(-1)
    return entropy.mean() / math.log(slots)


def _softmax_over_channels(x: Tensor) -> Tensor:
    """Softmax over dim 1 of [B, L, H, W], along whichever dimension is innermost in memory:
    in channels_last the slots are, and the softmax runs on a contiguous [B, H, W, L] view."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.softmax(x.permute(0, 2, 3, 1), dim=-1).permute(0, 3, 1, 2)
    return torch.softmax(x, dim=1)


class NormalityMemory(nn.Module):
    """L keys and L values of C channels, both trained.

    Student features address the keys and read back a mix of values (:meth:`recall`); exemplar
    teacher features address the values themselves and must be rebuilt from them
    (:meth:`rebuild`), which is how the values learn what normal features look like.
    Addressing is a softmax over cosine similarity divided by ``temperature``: cosine lies in
    [-1, 1], so without a small temperature the weights are nearly uniform for any L.
    """

    def __init__(self, channels: int, slots: int, temperature: float):
        super().__init__()
        self.keys = nn.Parameter(torch.randn(slots, channels))
        self.values = nn.Parameter(torch.randn(slots, channels))
        self.temperature = temperature

    def _read(self, features: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """The mix of values [B, C, H, W] that ``features`` [B, C, H, W] read when they address
        ``rows`` [L, C], and the read weights [BHW, L] (row b*H*W + y*W + x: position (b, y, x))."""
        slots = rows.shape[0]
        # In float32 even under autocast: with a small temperature, bfloat16 rounding of the
        # cosines would visibly change which slots are read.
        with torch.autocast(features.device.type, enabled=False):
            queries = F.normalize(features.float(), dim=1)
            # 1/T scales the L normalised rows, not the B*H*W x L similarities.
            rows = F.normalize(rows.float(), dim=1) / self.temperature
            # Both products are 1x1 convolutions: they run in the features' own layout, with no
            # permuted copies, through the convolution library (on CPU about a quarter faster,
            # forward + backward, than matmuls on a [B*H*W, C] view at stride 4, 256 px).
            similarity = F.conv2d(queries, rows[:, :, None, None])  # [B, L, H, W]
            weights = _softmax_over_channels(similarity)
            read = F.conv2d(weights, self.values.float().t()[:, :, None, None])
        return read, weights.permute(0, 2, 3, 1).reshape(-1, slots)

    def recall(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Normal features recalled for ``features`` [B, C, H, W] through the keys, and the weights [BHW, L]."""
        return self._read(features, self.keys)

    def rebuild(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """``features`` [B, C, H, W] rebuilt as a mix of values addressed by the values, and the weights."""
        return self._read(features, self.values)


@dataclass(frozen=True)
class MemorySettings:
    """Size, read temperature, places and fusion of the NR memories a student holds."""

    slots: int
    temperature: float
    stages: tuple[MemoryStage, ...]
    fusion: str = "concat"


class MemoryFusion(nn.Module):
    """Reads a NormalityMemory with a feature map and fuses the recalled normal feature back in.

    ``concat`` (the paper's fusion): [feature, recalled] through a 1x1 conv + BN + ReLU back to C
    channels. ``add``: a residual sum feature + recalled, with no parameters. Either way the next
    network stage receives a tensor of the shape it was built for.
    """

    def __init__(self, channels: int, slots: int, temperature: float, mode: str = "concat"):
        super().__init__()
        if mode not in FUSION_MODES:
            raise ValueError(f"fusion mode must be one of {FUSION_MODES}, not {mode!r}")
        self.memory = NormalityMemory(channels, slots, temperature)
        self.mode = mode
        self.fuse = (nn.Sequential(nn.Conv2d(2 * channels, channels, 1, bias=False),
                                   nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
                     if mode == "concat" else None)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        recalled, weights = self.memory.recall(features)
        recalled = recalled.to(features.dtype)
        if self.fuse is None:
            return features + recalled, weights
        return self.fuse(torch.cat([features, recalled], dim=1)), weights
