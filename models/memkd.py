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
from models.memory import normalised_entropy


class StudentOutput(NamedTuple):
    """What every student returns: features in the teacher's stage order (strides 4, 8, 16) and
    each memory's read weights."""

    features: list[Tensor]
    recall_weights: list[Tensor]


class MemKD(nn.Module):
    """A frozen teacher, a student (``STStudent`` or ``RDStudent``), and the loss weights.

    ``student`` must take ``(images, teacher_features)``, return a ``StudentOutput``, and expose
    ``memories`` (a ModuleList of MemoryFusion, empty for the baseline) with
    ``memory_targets(teacher_features)``, what each memory's values learn to rebuild.
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
        self._exemplar_features: list[Tensor] = []
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
        """Fix the exemplar set: its teacher features, computed once (the teacher never changes)."""
        if not self.has_memory:
            return
        self._exemplar_features = self.teacher_features(images)

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
        a cache); otherwise the teacher runs here.
        """
        teacher = self.teacher_features(images) if teacher_features is None else teacher_features
        student = self.student(images, teacher)
        kd = self.distillation_loss(student.features, teacher)
        terms = {"kd": kd}
        total = kd
        if self.has_memory:
            if not self._exemplar_features:
                raise RuntimeError("set_exemplars() must be called before training a model with memory")
            nm, orth, exemplar_entropy = [], [], []
            targets = self.student.memory_targets(self._exemplar_features)
            for fusion, target in zip(self.student.memories, targets):
                rebuilt, weights = fusion.memory.rebuild(target)
                nm.append(normality_embedding_loss(rebuilt, target))
                orth.append(orthogonality_loss(fusion.memory.keys, fusion.memory.values))
                exemplar_entropy.append(normalised_entropy(weights.detach()))
            terms["nm"] = torch.stack(nm).mean()
            terms["orth"] = torch.stack(orth).mean()
            total = kd + self.lambda1 * terms["nm"] + self.lambda2 * terms["orth"]
            terms["recall_entropy"] = torch.stack([normalised_entropy(w.detach()) for w in student.recall_weights]).mean()
            terms["exemplar_entropy"] = torch.stack(exemplar_entropy).mean()
        logs = {name: value.detach() for name, value in terms.items()}
        return {"loss": total, **logs}

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
