"""Build a MemKD model (ST or RD student, with or without memory) from its parts' settings."""
from __future__ import annotations

import torch
from torch import nn

from models.anomaly_map import MapSettings
from models.feature_extractor import FeatureExtractor, build_network
from models.memkd import MemKD
from models.memory import MemorySettings
from models.reverse_distillation import RDStudent
from models.stpm import STStudent
from models.teacher_weights import fingerprint_weights, resolve_teacher_weights

STUDENTS: dict[str, type[nn.Module]] = {"st": STStudent, "rd": RDStudent}


def build_model(method: str, backbone: str, *, pretrained: bool, teacher_weights: str | None,
                fallback_to_random: bool, memory: MemorySettings | None, distillation: str, lambda1: float,
                lambda2: float, map_settings: MapSettings, seed: int) -> MemKD:
    """The teacher (exactly the resolved weights: a local file, torchvision's pinned ImageNet weights
    or a seeded random init), a student seeded by ``seed``, the loss weights and map settings.

    ``memory`` None builds the baseline student (STPM or RD4AD).
    """
    state, description = resolve_teacher_weights(backbone, pretrained, teacher_weights, fallback_to_random)
    torch.manual_seed(seed)  # the same seed gives the same random teacher and student
    if state is None:  # a seeded random teacher: its source weights are this fresh network's
        state = build_network(backbone).state_dict()
    teacher = FeatureExtractor(backbone, state, frozen=True)
    student = STUDENTS[method](backbone, teacher.channels, memory)
    return MemKD(teacher, student, distillation, lambda1, lambda2, map_settings, fingerprint_weights(state), description)
