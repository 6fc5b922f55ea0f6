"""STPM student: a randomly initialised copy of the teacher network, with NR memories between stages."""
from __future__ import annotations

from torch import Tensor, nn

from models.feature_extractor import FeatureExtractor
from models.memkd import StudentOutput
from models.memory import MemoryFusion, MemoryRead, MemorySettings
from models.registry import MEMORY_STAGES, MemoryStage


class STStudent(nn.Module):
    """Student of the same architecture as the teacher, trained from scratch on the images.

    With memory, the output of each stage in ``memory.stages`` (1 and/or 2) reads a memory and the
    fused feature feeds the next stage. That output imitates the same teacher stage, so the memory
    is queried in the space its values are taught to rebuild (:meth:`memory_targets`).
    """

    MEMORY_STAGES: tuple[MemoryStage, ...] = MEMORY_STAGES["st"]

    def __init__(self, backbone: str, teacher_channels: tuple[int, int, int], memory: MemorySettings | None):
        super().__init__()
        self.network = FeatureExtractor(backbone)
        self.memory_stages: tuple[MemoryStage, ...] = tuple(memory.stages) if memory else ()
        self.memories = nn.ModuleList(
            MemoryFusion(teacher_channels[s - 1], memory.slots, memory.temperature, memory.fusion)
            for s in self.memory_stages)
        # Which memory_targets never change for an image: all of them, teacher features.
        self.fixed_memory_targets = (True,) * len(self.memory_stages)

    def memory_targets(self, teacher_features: list[Tensor]) -> list[Tensor]:
        """What each memory's values learn to rebuild: the teacher's features at its stage."""
        return [teacher_features[s - 1] for s in self.memory_stages]

    def forward(self, images: Tensor, teacher_features: list[Tensor]) -> StudentOutput:
        reads: list[MemoryRead] = []

        def fuse_memory(stage_index: int, feature: Tensor) -> Tensor:
            stage = stage_index + 1
            if stage not in self.memory_stages:
                return feature
            fused, memory_read = self.memories[self.memory_stages.index(stage)](feature)
            reads.append(memory_read)
            return fused

        features = self.network(images, fuse_memory if self.memory_stages else None)
        return StudentOutput(features, reads)
