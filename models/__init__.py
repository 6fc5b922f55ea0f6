"""Build a MemKD model (ST or RD, with or without memory) from a resolved config."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.feature_extractor import BACKBONES, FeatureExtractor
from models.memkd import MemKD
from models.reverse_distillation import RDStudent
from models.stpm import STStudent
from models.student import MemorySettings
from models.teacher_weights import resolve_teacher_weights

STUDENTS: dict[str, type[nn.Module]] = {"st": STStudent, "rd": RDStudent}
# Display names: the paper's method with memory, the baseline it builds on without.
NAMES = {("st", True): "MemKD-ST", ("st", False): "STPM", ("rd", True): "MemKD-RD", ("rd", False): "RD4AD"}


def method_name(method: str, memory_enabled: bool) -> str:
    """'MemKD-ST', 'STPM', 'MemKD-RD' or 'RD4AD'."""
    return NAMES[(method, memory_enabled)]


def build_model(method: str, config: dict[str, Any]) -> MemKD:
    """The teacher (weights resolved as configured), a freshly seeded student, and the loss weights."""
    backbone = config["model.backbone"]
    state, description = resolve_teacher_weights(backbone, config["model.pretrained"], config["model.teacher_weights"],
                                                 config["model.fallback_to_random"])
    torch.manual_seed(config["train.seed"])  # the same seed gives the same random teacher and student
    teacher = FeatureExtractor(backbone, state, frozen=True)
    memory = MemorySettings(config["memory.slots"], config["memory.temperature"]) if config["memory.enabled"] else None
    student = STUDENTS[method](backbone, teacher.channels, memory)
    return MemKD(teacher, student, config["loss.lambda1"], config["loss.lambda2"], config["eval.sigma"], description)


__all__ = ["BACKBONES", "MemKD", "build_model", "method_name"]
