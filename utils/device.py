"""Where and how tensors run: the device, memory layout, bfloat16 autocast on CUDA, data loaders.

channels_last (``train.channels_last``, off by default) lets the convolution library run its
fastest kernels without converting layouts in every layer. It is off because on CPU it does not
only round differently: the first step's gradient of a MobileNetV2 student differs from the NCHW
one by 0.4 % even in float64 (ResNets: 4e-7), a difference of the library's kernels that we do
not want in the numbers.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from utils.distributed import ShardedBatches, World
from utils.errors import UserError


def select_device(choice: str) -> torch.device:
    """``auto``: CUDA when present, else CPU. Asking for CUDA without one is a user error."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    return torch.device("cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu")


def autocast(amp: bool, device: torch.device) -> contextlib.AbstractContextManager:
    """bfloat16 autocast when ``amp`` (``train.amp``) is set and the device is CUDA, else nothing."""
    # bfloat16 keeps float32's range, so no loss scaling is needed; CPU runs stay in float32.
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_loader(dataset: Dataset, batch_size: int, workers: int, device: torch.device,
                generator: torch.Generator | None = None, world: World = World(),
                batches: Sequence[Sequence[int]] | None = None) -> DataLoader:
    """Batches of ``dataset`` loaded by ``workers`` processes, shuffled by ``generator`` when one is
    given (training), else in order; or exactly the index lists ``batches`` when given.

    In a world of several processes a shuffled loader gives each rank its share of every batch.
    """
    pin = device.type == "cuda"
    if batches is not None:
        return DataLoader(dataset, batch_sampler=batches, num_workers=workers, pin_memory=pin)
    if generator is not None and world.size > 1:
        return DataLoader(dataset, batch_sampler=ShardedBatches(len(dataset), batch_size, generator, world),
                          num_workers=workers, pin_memory=pin)
    return DataLoader(dataset, batch_size=batch_size, shuffle=generator is not None, generator=generator,
                      num_workers=workers, pin_memory=pin)


def memory_format(channels_last: bool) -> torch.memory_format:
    """``torch.channels_last`` when ``channels_last`` (``train.channels_last``), else the usual NCHW layout."""
    return torch.channels_last if channels_last else torch.contiguous_format


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """A batch of images on ``device``, channels-last when asked (``train.channels_last``).

    The copy is asynchronous from pinned memory (``make_loader`` pins on CUDA).
    """
    return images.to(device, non_blocking=True, memory_format=memory_format(channels_last))


def tune_for(device: torch.device) -> None:
    """cuDNN autotuning on CUDA: the input size never changes within a run, so it pays after a step."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
