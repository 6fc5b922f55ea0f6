"""Teacher features of the training images, computed once per run instead of once per epoch.

Training has no random augmentation and the teacher never changes, so an image's teacher
features are the same in every epoch. :class:`TeacherFeatureCache` computes them once, before
the first epoch, and keeps them on the training device in float32 (exact) or float16 (half the
memory, values rounded to float16) up to a memory budget; the training images past the budget
are *streamed*: their teacher features are computed in every step, as without a cache.

Features are computed in batches of the size training's batches have (``train.batch_size``, or
the whole training set when it is smaller), with the images in the form training gives them
(device, memory format, autocast), so that on CPU a cached feature is bit-identical to the one an
uncached step computes for a full batch. Nothing is padded: the last batch overlaps the one
before it (the teacher's float rounding can depend on the batch size, measured, not on which
images share the batch), so the teacher sees each image at most twice.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.data import Dataset

from engine.config import TrainSection
from utils.device import autocast, make_loader
from utils.errors import UserError

# ``train.feature_cache``: the stored dtype, or "off" for no cache.
CACHE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}
FEATURE_STRIDES = (4, 8, 16)  # the teacher's three stages (models.feature_extractor)

TeacherFn = Callable[[Tensor], list[Tensor]]


class IndexedDataset(Dataset):
    """``dataset``'s items with their position in ``dataset`` added under ``"index"``.

    Same length, so a DataLoader shuffled by the same generator yields the same batches.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[index], "index": index}


def feature_bytes_per_image(channels: tuple[int, ...], image_size: int, dtype: torch.dtype) -> int:
    """Bytes the teacher features of one ``image_size`` image take: stages at strides 4, 8, 16."""
    elements = sum(c * (image_size // stride) ** 2 for c, stride in zip(channels, FEATURE_STRIDES))
    return elements * torch.empty((), dtype=dtype).element_size()


def _memory_format(t: Tensor) -> torch.memory_format:
    """The layout of a 4-D tensor, so stored features come back exactly as the teacher made them."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class TeacherFeatureCache:
    """Teacher features of the first ``capacity`` images of a training split, one tensor per stage.

    Build it with :meth:`fill`; then :meth:`lookup` gives a batch's features from the store for
    cached images and computes the rest with the teacher.
    """

    def __init__(self, dtype: torch.dtype, capacity: int, bytes_per_image: int, total: int, budget_mb: int):
        self.dtype = dtype
        self.capacity = capacity  # images 0 .. capacity-1 of the split are cached
        self.bytes_per_image = bytes_per_image
        self.total = total  # images in the split
        self.budget_mb = budget_mb
        self._stores: list[Tensor] = []
        self._teacher_dtypes: list[torch.dtype] = []

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def nbytes(self) -> int:
        """Memory the stored features take."""
        return sum(s.numel() * s.element_size() for s in self._stores)

    @classmethod
    def fill(cls, teacher: TeacherFn, dataset: Dataset, channels: tuple[int, ...], image_size: int,
             train: TrainSection, workers: int, device: torch.device,
             to_device: Callable[[Tensor], Tensor]) -> "TeacherFeatureCache | None":
        """The cache of ``train.feature_cache`` for ``dataset`` (None when it is ``off``).

        ``to_device`` puts a CPU batch of images where and how training puts it; ``workers`` load
        them. As many images as ``train.cache_budget_mb`` holds are computed now, in batches of
        ``train.batch_size`` in dataset order; the rest stream.
        """
        if train.feature_cache == "off":
            return None
        dtype = CACHE_DTYPES[train.feature_cache]
        budget_mb = train.cache_budget_mb
        per_image = feature_bytes_per_image(channels, image_size, dtype)
        total = len(dataset)  # type: ignore[arg-type]
        cache = cls(dtype, min(total, budget_mb * 2**20 // per_image), per_image, total, budget_mb)
        if cache.capacity:
            cache._compute(teacher, dataset, min(train.batch_size, total), workers, train.amp, device, to_device)
        return cache

    @torch.no_grad()
    def _compute(self, teacher: TeacherFn, dataset: Dataset, batch_size: int, workers: int, amp: bool,
                 device: torch.device, to_device: Callable[[Tensor], Tensor]) -> None:
        """Fill the stores with the features of ``dataset``'s first ``capacity`` images, computed in
        batches of exactly ``batch_size`` consecutive images (at most the dataset's size)."""
        total = len(dataset)  # type: ignore[arg-type]
        starts = [min(start, total - batch_size) for start in range(0, self.capacity, batch_size)]
        loader = make_loader(dataset, batch_size, workers, device,
                             batches=[list(range(s, s + batch_size)) for s in starts])
        done = 0
        with autocast(amp, device):
            for start, batch in zip(starts, loader):
                features = teacher(to_device(batch["image"]))
                if not self._stores:
                    self._allocate(features, device)
                stop = min(start + batch_size, self.capacity)
                new = slice(done - start, stop - start)  # the last batch overlaps images stored already
                for store, f in zip(self._stores, features):
                    store[done:stop] = f[new]
                    if self.dtype == torch.float16 and not bool(torch.isfinite(store[done:stop]).all()):
                        raise UserError(f"teacher features do not fit train.feature_cache={self.dtype_name} "
                                        "(too large for it); set train.feature_cache=float32")
                done = stop

    def _allocate(self, features: list[Tensor], device: torch.device) -> None:
        stored = sum(f[0].numel() for f in features) * torch.empty((), dtype=self.dtype).element_size()
        if stored != self.bytes_per_image:
            raise RuntimeError(f"teacher features take {stored} bytes per image, not the {self.bytes_per_image} "
                               "expected from strides 4, 8, 16")
        self._teacher_dtypes = [f.dtype for f in features]
        self._stores = [torch.empty((self.capacity, *f.shape[1:]), dtype=self.dtype, device=device,
                                    memory_format=_memory_format(f)) for f in features]

    def lookup(self, indices: Tensor, images: Tensor, teacher: TeacherFn) -> list[Tensor]:
        """Teacher features of ``images``, the batch of dataset items ``indices``: read from the
        store where cached, computed by ``teacher`` for the rest (in one smaller batch)."""
        hit = indices < self.capacity
        if bool(hit.all()):
            return self._read(indices)
        if not bool(hit.any()):
            return teacher(images)
        on_device = hit.to(images.device)
        fresh = teacher(images[~on_device])
        stored = self._read(indices[hit])
        merged = []
        for f, s in zip(fresh, stored):
            whole = torch.empty((len(indices), *f.shape[1:]), dtype=f.dtype, device=f.device,
                                memory_format=_memory_format(f))
            whole[on_device] = s
            whole[~on_device] = f
            merged.append(whole)
        return merged

    def _read(self, indices: Tensor) -> list[Tensor]:
        index = indices.to(self._stores[0].device)
        # Advanced indexing keeps the stored layout (index_select would not).
        return [store[index].to(dtype) for store, dtype in zip(self._stores, self._teacher_dtypes)]

    def describe(self) -> str:
        """One line for the run log: what is cached, its size and dtype, what streams."""
        line = (f"teacher features cached: {self.capacity} of {self.total} training images, "
                f"{self.nbytes / 2**20:.0f} MB {self.dtype_name} (train.cache_budget_mb={self.budget_mb})")
        if self.capacity < self.total:
            line += f"; the other {self.total - self.capacity} are computed in every step"
        return line
