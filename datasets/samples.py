"""The one Dataset class every layout produces, and the seeded train/val split.

A layout module only has to list ``Sample`` records; decoding, resizing, caching and
normalisation live here, so every dataset yields items of exactly the same form.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.images import MIN_IMAGE_SIDE, check_image_header, load_mask, load_rgb, normalise, resize_rgb


@dataclass(frozen=True)
class Sample:
    """One image of a split.

    label: 0 good, 1 defect. mask: the ground-truth file, None for good images and for
    defects without a mask (allowed only in the ``folder`` layout). defect: the defect type
    ("good" for normal images). mask_nonzero: binarise the mask with > 0 instead of > 127.
    extra_masks: further mask files of the same image, one per defect (MVTec LOCO AD); the
    ground truth is the union of ``mask`` and these.
    """

    image: Path
    label: int
    mask: Path | None = None
    defect: str = "good"
    mask_nonzero: bool = False
    extra_masks: tuple[Path, ...] = ()

    @property
    def masks(self) -> tuple[Path, ...]:
        """Every mask file of the image (empty for a good image)."""
        return () if self.mask is None else (self.mask, *self.extra_masks)

    @property
    def has_mask(self) -> bool:
        """True when the pixel ground truth is known: a good image, or a defect with its mask."""
        return self.label == 0 or self.mask is not None


class AnomalyDataset(Dataset):
    """Items ``{"image", "mask", "label", "path", "has_mask", "defect"}`` for a list of samples.

    image: 3xSxS float32, ImageNet-normalised. mask: 1xSxS float32 of exactly 0. / 1.
    (all zero for good images and for defects without a mask, see has_mask).
    Decoded, resized pixels are cached per index as uint8 on first access; normalisation
    happens at every __getitem__. With DataLoader workers each process fills its own copy of
    the cache (nothing is shared or written back), so results do not depend on num_workers;
    call ``preload()`` in the main process first to let forked workers inherit a full cache.
    """

    def __init__(self, samples: Sequence[Sample], image_size: int) -> None:
        self.samples: list[Sample] = list(samples)
        self.image_size = int(image_size)
        self._cache: list[tuple[np.ndarray, np.ndarray | None] | None] = [None] * len(self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        """The image labels in index order (0 good, 1 defect), without decoding anything."""
        return [s.label for s in self.samples]

    def _pixels(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        cached = self._cache[index]
        if cached is None:
            s = self.samples[index]
            rgb = resize_rgb(load_rgb(s.image), self.image_size)
            mask = None
            if s.label == 1 and s.mask is not None:
                mask = load_mask(s.mask, self.image_size, nonzero=s.mask_nonzero)
                for extra in s.extra_masks:
                    mask |= load_mask(extra, self.image_size, nonzero=s.mask_nonzero)
            cached = self._cache[index] = (rgb, mask)
        return cached

    def preload(self) -> None:
        """Decode every item now (e.g. before starting DataLoader workers)."""
        for i in range(len(self)):
            self._pixels(i)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        index %= len(self)
        rgb, mask = self._pixels(index)
        s = self.samples[index]
        size = self.image_size
        mask_t = torch.zeros(1, size, size) if mask is None else torch.from_numpy(mask).float().unsqueeze(0)
        return {
            "image": normalise(rgb),
            "mask": mask_t,
            "label": s.label,
            "path": str(s.image),
            "has_mask": s.has_mask,
            "defect": s.defect,
        }


def check_files(samples: Sequence[Sample]) -> None:
    """Raise UserError for the first image or mask that is empty or not a recognisable image,
    or an image smaller than MIN_IMAGE_SIDE on a side."""
    for s in samples:
        check_image_header(s.image, MIN_IMAGE_SIDE)
        for mask in s.masks:
            check_image_header(mask)


def n_held_out(n: int, fraction: float) -> int:
    """How many of ``n`` items a ``fraction`` hold-out takes: round(fraction*n), at least 1 when
    fraction > 0 and n >= 2, and never all of them (at least one stays behind)."""
    if fraction <= 0 or n < 2:
        return 0
    return min(max(1, round(fraction * n)), n - 1)


def seeded_split(items: Sequence[Sample], fraction: float, seed: int, stream: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Split ``items`` into (kept, held_out), held_out having ``n_held_out(len, fraction)`` items.

    The choice depends only on the sorted image paths, ``seed`` and ``stream`` (distinct
    streams give independent draws from one seed); both parts keep path order.
    """
    ordered = sorted(items, key=lambda s: str(s.image))
    k = n_held_out(len(ordered), fraction)
    perm = np.random.default_rng([int(seed) & 0xFFFFFFFF, stream]).permutation(len(ordered))
    held = set(perm[:k].tolist())
    kept = [s for i, s in enumerate(ordered) if i not in held]
    held_out = [s for i, s in enumerate(ordered) if i in held]
    return kept, held_out
