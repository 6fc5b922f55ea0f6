"""The model a run's settings describe: models/build.py given the fields it needs."""
from __future__ import annotations

from engine.config import RunSettings
from models.anomaly_map import MapSettings
from models.build import build_model
from models.memkd import MemKD
from models.memory import MemorySettings


def map_settings(settings: RunSettings) -> MapSettings:
    """How the run's anomaly maps are scored (``eval.combine``, ``eval.sigma``)."""
    return MapSettings(settings.eval.combine, settings.eval.sigma)


def memory_settings(settings: RunSettings) -> MemorySettings | None:
    """The run's NR memories, or None for the baseline (``memory.enabled=false``)."""
    memory = settings.memory
    if not memory.enabled:
        return None
    return MemorySettings(memory.slots, memory.temperature, memory.stages, memory.fusion)


def build_run_model(settings: RunSettings) -> MemKD:
    """Teacher, freshly seeded student and losses of the run, on the CPU."""
    model, loss = settings.model, settings.loss
    return build_model(settings.method, model.backbone, pretrained=model.pretrained,
                       teacher_weights=model.teacher_weights, fallback_to_random=model.fallback_to_random,
                       memory=memory_settings(settings), distillation=loss.distillation, lambda1=loss.lambda1,
                       lambda2=loss.lambda2, map_settings=map_settings(settings), seed=settings.train.seed)
