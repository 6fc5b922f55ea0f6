"""Where student and teacher disagree: the anomaly map and the image score.

Two published ways of turning per-layer disagreement into one map (``eval.combine``):

* ``product``: STPM's official ``test`` (gdwang08/STFPM, main.py). Per layer ||n(t) - n(s)||^2 of
  channel-normalised features, bilinearly upsampled (align_corners=False) to the first layer's
  resolution, multiplied over layers, then upsampled to the image (the code's cv2.resize).
* ``sum``: RD4AD's official ``cal_anomaly_map(amap_mode='a')`` (hq-deng/RD4AD, test.py). Per layer
  1 - cosine similarity, bilinearly upsampled (align_corners=True) to the image, summed.

Then an optional Gaussian smoothing (``eval.sigma``; RD4AD's ``gaussian_filter(sigma=4)``, STPM has
none), and the image score is the map's maximum in both papers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from models.registry import COMBINE_MODES


@dataclass(frozen=True)
class MapSettings:
    """How an anomaly map is scored: an evaluation choice, changeable without retraining."""

    combine: str = "sum"
    sigma: float = 4.0


def stpm_map(student: Sequence[Tensor], teacher: Sequence[Tensor], size: int) -> Tensor:
    """STPM's map [B, size, size]: product of per-layer squared distances of normalised features."""
    first = teacher[0].shape[-2:]
    total = None
    for s, t in zip(student, teacher):
        layer = (F.normalize(t.float(), dim=1) - F.normalize(s.float(), dim=1)).pow(2).sum(1, keepdim=True)
        layer = F.interpolate(layer, size=first, mode="bilinear", align_corners=False)
        total = layer if total is None else total * layer
    return F.interpolate(total, size=(size, size), mode="bilinear", align_corners=False).squeeze(1)


def rd4ad_map(student: Sequence[Tensor], teacher: Sequence[Tensor], size: int) -> Tensor:
    """RD4AD's map [B, size, size]: sum of per-layer 1 - cosine, each upsampled to the image."""
    total = None
    for s, t in zip(student, teacher):
        layer = 1 - F.cosine_similarity(s.float(), t.float(), dim=1).unsqueeze(1)
        layer = F.interpolate(layer, size=(size, size), mode="bilinear", align_corners=True)
        total = layer if total is None else total + layer
    return total.squeeze(1)


def anomaly_map(student: Sequence[Tensor], teacher: Sequence[Tensor], size: int, settings: MapSettings) -> Tensor:
    """The configured map [B, size, size], smoothed when ``settings.sigma`` > 0."""
    combine = dict(zip(COMBINE_MODES, (stpm_map, rd4ad_map), strict=True))[settings.combine]
    return gaussian_blur(combine(student, teacher, size), settings.sigma)


def gaussian_kernel(sigma: float, device: torch.device | None = None) -> Tensor:
    """Normalised 1-D Gaussian, truncated at 4 sigma like scipy.ndimage.gaussian_filter."""
    radius = int(4 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def _symmetric_pad(x: Tensor, pad: int, dim: int) -> Tensor:
    """Pad ``x`` by ``pad`` on both ends of ``dim`` with scipy's mode='reflect' (edge sample repeated).

    Pads larger than the side repeat the reflection, as scipy does, one side-length at a time.
    """
    while pad > 0:
        step = min(pad, x.shape[dim])
        head = x.narrow(dim, 0, step).flip(dim)
        tail = x.narrow(dim, x.shape[dim] - step, step).flip(dim)
        x = torch.cat([head, x, tail], dim=dim)
        pad -= step
    return x


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """``scipy.ndimage.gaussian_filter(map, sigma)`` for a batch of maps [B, H, W], on their device.

    Separable, truncated at 4 sigma, borders in scipy's default mode='reflect'; ``sigma`` 0
    returns the maps unchanged.
    """
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel(sigma, maps.device)
    radius = kernel.numel() // 2
    x = _symmetric_pad(maps.unsqueeze(1), radius, 3)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = _symmetric_pad(x, radius, 2)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x.squeeze(1)


def image_scores(maps: Tensor) -> Tensor:
    """Image anomaly score: the maximum of each map [B, H, W] -> [B]."""
    return maps.flatten(1).amax(1)
