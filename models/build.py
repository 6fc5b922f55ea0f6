"""Build a MemKD model (ST or RD, with or without memory) from a resolved config."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.anomaly_map import MapSettings
from models.feature_extractor import FeatureExtractor, build_network
from models.memkd import MemKD
from models.memory import MemorySettings
from models.reverse_distillation import RDStudent
from models.stpm import STStudent
from models.teacher_weights import fingerprint_weights, resolve_teacher_weights
from utils.errors import UserError

STUDENTS: dict[str, type[nn.Module]] = {"st": STStudent, "rd": RDStudent}
def memory_settings(method: str, config: dict[str, Any]) -> MemorySettings | None:
    """The memory of ``config`` for ``method``'s student (None without memory); UserError for
    ``memory.stages`` the student cannot hold."""
    if not config["memory.enabled"]:
        return None
    stages = tuple(config["memory.stages"])
    allowed = STUDENTS[method].MEMORY_STAGES
    wrong = [s for s in stages if s not in allowed]
    if wrong or not stages or len(set(stages)) != len(stages):
        raise UserError(f"memory.stages={list(stages)} does not fit trainRM_{method.upper()}.py; give distinct "
                        f"places among {list(allowed)}, or memory.enabled=false for no memory")
    return MemorySettings(config["memory.slots"], config["memory.temperature"], stages, config["memory.fusion"])


def build_model(method: str, config: dict[str, Any]) -> MemKD:
    """The teacher (exactly the resolved weights), a freshly seeded student, losses and map settings."""
    backbone = config["model.backbone"]
    state, description = resolve_teacher_weights(backbone, config["model.pretrained"], config["model.teacher_weights"],
                                                 config["model.fallback_to_random"])
    torch.manual_seed(config["train.seed"])  # the same seed gives the same random teacher and student
    if state is None:  # a seeded random teacher: its source weights are this fresh network's
        state = build_network(backbone).state_dict()
    teacher = FeatureExtractor(backbone, state, frozen=True)
    student = STUDENTS[method](backbone, teacher.channels, memory_settings(method, config))
    return MemKD(teacher, student, config["loss.distillation"], config["loss.lambda1"], config["loss.lambda2"],
                 MapSettings.from_config(config), fingerprint_weights(state), description)

