"""What every student returns, and the memory settings students share."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Union

from torch import Tensor

# A place that can hold a memory: a teacher stage number (1, 2, 3) or "bottleneck" (RD only).
MemoryStage = Union[int, str]


@dataclass(frozen=True)
class MemorySettings:
    """Size, read temperature, places and fusion of the NR memories a student holds."""

    slots: int
    temperature: float
    stages: tuple[MemoryStage, ...]
    fusion: str = "concat"


class StudentOutput(NamedTuple):
    """Student features in the teacher's stage order (strides 4, 8, 16) and each memory's read weights."""

    features: list[Tensor]
    recall_weights: list[Tensor]
