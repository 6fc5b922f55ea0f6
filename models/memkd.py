"""MemKD: teacher, student and NR memories behind the small interface the engine uses.

The engine only calls :meth:`MemKD.trainable_parameters`, :meth:`MemKD.set_exemplars`,
:meth:`MemKD.loss` and :meth:`MemKD.anomaly_map`; whether the student is STPM's network or
RD4AD's decoder, and whether it has memories, is decided when the student is built.
"""
from __future__ import annotations

import torch
from typing import NamedTuple

from torch import Tensor, nn

from models.anomaly_map import MapSettings, anomaly_map
from models.feature_extractor import FeatureExtractor
from models.losses import DISTILLATION_LOSSES, normality_embedding_loss, orthogonality_loss
from models.memory import MemoryRead, normalised_entropy, positions, unit_vectors


class StudentOutput(NamedTuple):
    """What every student returns: features in the teacher's stage order (strides 4, 8, 16) and
    what each memory read, in the order of ``student.memories``."""

    features: list[Tensor]
    memory_reads: list[MemoryRead]


def _unit_positions(features: Tensor) -> Tensor:
    """``features`` [B, C, H, W] as unit rows [B*H*W, C], what a memory rebuilds and L_NM compares."""
    return unit_vectors(positions(features.float()), dim=-1)


class MemKD(nn.Module):
    """A frozen teacher, a student (``STStudent`` or ``RDStudent``), and the loss weights.

    ``student`` must take ``(images, teacher_features)``, return a ``StudentOutput``, and expose
    ``memories`` (a ModuleList of MemoryFusion, empty for the baseline) with
    ``memory_targets(teacher_features)``, what each memory's values learn to rebuild, and
    ``fixed_memory_targets``, which of those depend only on the image (not on trained weights).
    ``distillation`` names the L_KD form (``models.losses.DISTILLATION_LOSSES``); ``map_settings``
    is how :meth:`anomaly_map` scores, an evaluation choice that may be replaced after training.
    ``teacher_fingerprint`` identifies the weights the teacher was built from.
    """

    def __init__(self, teacher: FeatureExtractor, student: nn.Module, distillation: str, lambda1: float,
                 lambda2: float, map_settings: MapSettings, teacher_fingerprint: str = "",
                 teacher_description: str = ""):
        super().__init__()
        self.teacher = teacher
        self.student = student
        self.distillation_loss = DISTILLATION_LOSSES[distillation]
        self.lambda1, self.lambda2 = lambda1, lambda2
        self.map_settings = map_settings
        self.teacher_fingerprint = teacher_fingerprint
        self.teacher_description = teacher_description
        # [lambda1/M, lambda2/M] for each of the M memories: a constant that moves with the model.
        count = max(len(student.memories), 1)
        self.register_buffer("memory_term_weights", torch.tensor([lambda1 / count, lambda2 / count] * count),
                             persistent=False)
        self._exemplar_images: Tensor | None = None
        self._exemplar_features: list[Tensor] = []
        self._exemplar_units: list[Tensor | None] = []  # fixed targets as unit rows, None for moving ones
        self.set_inference_teacher(None)

    @property
    def has_memory(self) -> bool:
        return len(self.student.memories) > 0

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything that trains: the student, its bottleneck and memories. Never the teacher."""
        return [p for p in self.student.parameters() if p.requires_grad]

    def set_inference_teacher(self, network: nn.Module | None) -> None:
        """Compute every teacher feature with ``network``, a network equivalent to the teacher (e.g.
        its batch norms folded, models/folding.py), or with the teacher itself for None.

        It is kept outside the module tree: ``self.teacher``, ``state_dict()`` and ``.to()`` never
        see it, so the teacher stays exactly the library's weights. Call it after ``.to(device)``.
        """
        self.__dict__["_inference_teacher"] = network  # not nn.Module.__setattr__: no registration

    @torch.no_grad()
    def set_exemplars(self, images: Tensor) -> None:
        """Fix the exemplar set: its teacher features and, for the memories whose targets are
        teacher features, the normalised targets, each computed once (the teacher never changes)."""
        if not self.has_memory:
            return
        self._exemplar_images = images
        self._exemplar_features = self.teacher_features(images)
        targets = self.student.memory_targets(self._exemplar_features)
        self._exemplar_units = [_unit_positions(target) if fixed else None
                                for target, fixed in zip(targets, self.student.fixed_memory_targets, strict=True)]

    def _exemplar_unit_targets(self) -> list[Tensor]:
        """Each memory's exemplar targets as unit rows [N*H*W, C]: stored when fixed, recomputed
        when they move."""
        if not self._exemplar_features:
            raise RuntimeError("set_exemplars() must be called before training a model with memory")
        if all(unit is not None for unit in self._exemplar_units):
            return self._exemplar_units
        targets = self.student.memory_targets(self._exemplar_features)
        return [_unit_positions(target) if unit is None else unit
                for unit, target in zip(self._exemplar_units, targets)]

    @torch.no_grad()
    def teacher_features(self, images: Tensor) -> list[Tensor]:
        """The frozen teacher's features of ``images`` (strides 4, 8, 16): the same for an image in
        every epoch, so training may compute them once and pass them back to :meth:`loss`."""
        network = self.__dict__["_inference_teacher"]
        return (self.teacher if network is None else network)(images)

    def loss(self, images: Tensor, teacher_features: list[Tensor] | None = None) -> dict[str, Tensor]:
        """Losses on a batch of normal images: ``loss`` to minimise, plus detached terms to log.

        loss = L_KD + lambda1 * L_NM + lambda2 * L_Orth (the last two only with memory).
        ``teacher_features``, when given, must be :meth:`teacher_features` of ``images`` (e.g. from
        a cache); otherwise the teacher runs here. How selective the memories read is not computed
        here, where every operator costs a kernel launch per step: see :meth:`memory_entropies`.
        """
        teacher = self.teacher_features(images) if teacher_features is None else teacher_features
        student = self.student(images, teacher)
        kd = self.distillation_loss(student.features, teacher)
        terms = {"kd": kd}
        total = kd
        if self.has_memory:
            terms_per_memory = []  # [nm, orth] of each memory
            for fusion, memory_read, target in zip(self.student.memories, student.memory_reads,
                                                   self._exemplar_unit_targets()):
                rebuilt = fusion.memory.rebuild(target, memory_read)
                terms_per_memory += [normality_embedding_loss(rebuilt, target),
                                     orthogonality_loss(memory_read.unit_keys, memory_read.unit_values)]
            # total = kd + lambda1 * mean(nm) + lambda2 * mean(orth) as one product: per step this
            # is the whole cost of combining the memories' terms (dot, which autocast leaves in float32).
            memory_terms = torch.stack(terms_per_memory)
            total = kd + torch.dot(memory_terms, self.memory_term_weights.to(memory_terms.dtype))
            with torch.no_grad():
                terms["nm"], terms["orth"] = memory_terms.view(-1, 2).mean(0).unbind()
        logs = {name: value.detach() for name, value in terms.items()}
        return {"loss": total, **logs}

    @torch.no_grad()
    def memory_entropies(self) -> dict[str, float]:
        """How selective the memories read, on the fixed exemplar images with the student in eval
        mode (so nothing it holds changes): the normalised entropy (1 = uniform, 0 = one slot) of
        the student's recall weights and of the exemplar rebuild weights, averaged over memories.
        Logged once per epoch, outside the training step; empty without memory."""
        if not self.has_memory:
            return {}
        training = self.student.training
        self.student.eval()
        reads = self.student(self._exemplar_images, self._exemplar_features).memory_reads
        targets = self._exemplar_unit_targets()
        self.student.train(training)
        recall = [normalised_entropy(fusion.memory.recall_weights(memory_read.queries))
                  for fusion, memory_read in zip(self.student.memories, reads)]
        rebuild = [normalised_entropy(fusion.memory.rebuild_weights(target))
                   for fusion, target in zip(self.student.memories, targets)]
        return {"recall_entropy": torch.stack(recall).mean().item(),
                "exemplar_entropy": torch.stack(rebuild).mean().item()}

    @torch.no_grad()
    def distillation_error(self, images: Tensor) -> Tensor:
        """L_KD on a batch, for model selection on held-out normal images."""
        teacher = self.teacher_features(images)
        return self.distillation_loss(self.student(images, teacher).features, teacher)

    @torch.no_grad()
    def anomaly_map(self, images: Tensor) -> Tensor:
        """Anomaly maps [B, H, W] at image resolution, scored as ``map_settings`` says."""
        teacher = self.teacher_features(images)
        student = self.student(images, teacher).features
        return anomaly_map(student, teacher, images.shape[-1], self.map_settings)
