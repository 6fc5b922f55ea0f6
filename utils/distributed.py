"""Many processes, as torchrun starts them: who this process is, and the few collectives we need.

Plain ``python trainRM_ST.py`` is a world of one process and none of this does anything. Under
``torchrun --nproc_per_node=K`` (and ``--nnodes``/``--rdzv-*`` across machines) each process reads
its rank from the environment torchrun sets, joins one process group (NCCL on CUDA, gloo on CPU)
and either trains whole categories of a sweep (``train.parallel=categories``) or shares one
category's batches (``train.parallel=data``: each global batch is split over the ranks, the
gradients averaged, so the world trains the model one process would with the same global batch).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass(frozen=True)
class World:
    """This process's place among the processes torchrun started."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 evaluates, writes and prints what is written once."""
        return self.rank == 0


def current_world() -> World:
    """The world from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); one process without it."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def setup(world: World) -> torch.device | None:
    """Join the process group once (no-op for one process); on CUDA, this rank's own GPU.

    A rank also ends itself when its launcher dies (:func:`exit_with_parent`): a SIGKILLed torchrun
    cannot stop its workers, which would otherwise sleep in a collective for ever.
    """
    if world.size == 1 or dist.is_initialized():
        return None
    exit_with_parent()
    device = None
    if torch.cuda.is_available():
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device is not None else "gloo")
    return device


def exit_with_parent(interval: float = 2.0) -> threading.Thread:
    """Watch, from a daemon thread, for this process's parent to end (the process is then adopted
    by another, so ``os.getppid()`` changes), and exit at once with code 1 when it does."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        print(f"error: rank {os.environ.get('RANK', '?')}: its launcher (process {parent}) ended; stopping too",
              file=sys.stderr, flush=True)
        os._exit(1)

    watcher = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    watcher.start()
    return watcher


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op for one process)."""
    if dist.is_initialized():
        dist.barrier()


def average_gradients(parameters: Sequence[torch.nn.Parameter], world: World) -> None:
    """Average the gradients of ``parameters`` over the ranks, as DistributedDataParallel does.

    Every rank then takes the same optimiser step from the same weights, so the replicas stay
    identical without ever sending weights.
    """
    if world.size == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def all_finite(value: float, world: World) -> bool:
    """True when ``value`` is finite on every rank, so that all ranks stop together on divergence."""
    if world.size == 1:
        return bool(torch.isfinite(torch.tensor(value)))
    flag = torch.tensor([0.0 if torch.isfinite(torch.tensor(value)) else 1.0])
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag)
    return float(flag) == 0.0


def broadcast_buffers(module: torch.nn.Module, world: World) -> None:
    """Rank 0's BatchNorm statistics on every rank (each rank saw its own share of the batches)."""
    if world.size == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)


class ShardedBatches(Sampler[list[int]]):
    """The batches of one seeded shuffle, each split over the ranks: rank r takes every size-th image.

    With one process it yields exactly the batches ``DataLoader(shuffle=True, generator=g)`` would,
    so a single-process run is unchanged.
    """

    def __init__(self, num_items: int, batch_size: int, generator: torch.Generator, world: World):
        self.num_items, self.batch_size, self.generator, self.world = num_items, batch_size, generator, world

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.num_items, generator=self.generator).tolist()
        for start in range(0, self.num_items, self.batch_size):
            batch = order[start:start + self.batch_size][self.world.rank::self.world.size]
            if batch:
                yield batch

    def __len__(self) -> int:
        return -(-self.num_items // self.batch_size)


def main_says(flag: bool, world: World) -> bool:
    """Rank 0's ``flag`` on every rank (one process: the flag itself)."""
    if world.size == 1 or not dist.is_initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        value = value.cuda()
    dist.broadcast(value, src=0)
    return bool(value.item())
