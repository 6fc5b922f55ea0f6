"""STPM student: a randomly initialised copy of the teacher network, with NR memories between stages."""
from __future__ import annotations

from torch import Tensor, nn

from models.feature_extractor import FeatureExtractor
from models.memory import MemoryFusion
from models.student import MemorySettings, StudentOutput


class STStudent(nn.Module):
    """Student of the same architecture as the teacher, trained from scratch on the images.

    With memory, the outputs of stages 1 and 2 read a memory each, and the fused feature feeds the
    next stage. Memory i lives in teacher stage ``memory_targets[i]``'s space: the student's stage
    output it is queried with imitates that teacher stage, and its values are taught to rebuild it.
    """

    def __init__(self, backbone: str, teacher_channels: tuple[int, int, int], memory: MemorySettings | None):
        super().__init__()
        self.network = FeatureExtractor(backbone)
        self.memory_targets: tuple[int, ...] = (0, 1) if memory else ()
        self.memories = nn.ModuleList(
            MemoryFusion(teacher_channels[t], memory.slots, memory.temperature) for t in self.memory_targets)

    def forward(self, images: Tensor, teacher_features: list[Tensor]) -> StudentOutput:
        recall_weights: list[Tensor] = []

        def fuse_memory(stage: int, feature: Tensor) -> Tensor:
            fused, weights = self.memories[stage](feature)
            recall_weights.append(weights)
            return fused

        features = self.network(images, fuse_memory if self.memory_targets else None)
        return StudentOutput(features, recall_weights)
