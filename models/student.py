"""What every student returns, and the memory settings students share."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor


@dataclass(frozen=True)
class MemorySettings:
    """Size and read temperature of each NR memory a student holds."""

    slots: int
    temperature: float


class StudentOutput(NamedTuple):
    """Student features in the teacher's stage order (strides 4, 8, 16) and each memory's read weights."""

    features: list[Tensor]
    recall_weights: list[Tensor]
