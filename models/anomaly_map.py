"""Where student and teacher disagree: the anomaly map and the image score."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def distance_map(student: Sequence[Tensor], teacher: Sequence[Tensor], size: int) -> Tensor:
    """Per layer 1 - cosine(student, teacher) per position, upsampled to ``size``, summed: [B, size, size]."""
    total = None
    for s, t in zip(student, teacher):
        layer = 1 - F.cosine_similarity(s.float(), t.float(), dim=1).unsqueeze(1)
        layer = F.interpolate(layer, size=(size, size), mode="bilinear", align_corners=False)
        total = layer if total is None else total + layer
    return total.squeeze(1)


def gaussian_kernel(sigma: float, device: torch.device | None = None) -> Tensor:
    """Normalised 1-D Gaussian, truncated at 4 sigma like scipy.ndimage.gaussian_filter."""
    radius = int(4 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """Smooth a batch of maps [B, H, W] with a separable Gaussian on their own device.

    Borders are mirrored (scipy.ndimage's mode='mirror'); ``sigma`` 0 returns the maps unchanged.
    """
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel(sigma, maps.device)
    radius = kernel.numel() // 2
    x = maps.unsqueeze(1)
    # Reflect padding needs the pad to be smaller than the side; clamp for tiny maps.
    pad_h, pad_w = min(radius, x.shape[2] - 1), min(radius, x.shape[3] - 1)
    x = F.pad(x, (pad_w, pad_w, 0, 0), mode="reflect")
    x = F.conv2d(x, kernel[radius - pad_w: radius + pad_w + 1].view(1, 1, 1, -1) / _mass(kernel, radius, pad_w))
    x = F.pad(x, (0, 0, pad_h, pad_h), mode="reflect")
    x = F.conv2d(x, kernel[radius - pad_h: radius + pad_h + 1].view(1, 1, -1, 1) / _mass(kernel, radius, pad_h))
    return x.squeeze(1)


def _mass(kernel: Tensor, radius: int, pad: int) -> Tensor:
    """Renormalise a kernel clipped to ``pad`` for maps smaller than the kernel."""
    return kernel[radius - pad: radius + pad + 1].sum()


def image_scores(maps: Tensor) -> Tensor:
    """Image anomaly score: the maximum of each map [B, H, W] -> [B]."""
    return maps.flatten(1).amax(1)
