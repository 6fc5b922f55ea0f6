"""Three-stage features from a torchvision network: the frozen teacher and the ST student alike.

The network comes from torchvision's own builder; ``IntermediateLayerGetter`` drops everything
after the third stage, and the remaining children are grouped into three stages so a caller can
act between them (the ST student fuses recalled memory there). No network code is copied.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor, nn
from torchvision import models
from torchvision.models._utils import IntermediateLayerGetter

from models.registry import BACKBONES




def build_network(backbone: str, state_dict: Mapping[str, Tensor] | None = None) -> nn.Module:
    """The full torchvision network, randomly initialised or loaded from ``state_dict``.

    ``state_dict`` may lack the classification head; every other key must be present and fit.
    """
    network = getattr(models, backbone)(weights=None)  # torchvision's builder of that name
    if state_dict is not None:
        result = network.load_state_dict(state_dict, strict=False)
        missing = [k for k in result.missing_keys if not is_head(k)]
        if missing or result.unexpected_keys:
            raise ValueError(f"missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
    return network


def pinned_weights(backbone: str) -> models.WeightsEnum:
    """torchvision's weights entry that the registry pins for ``backbone`` (IMAGENET1K_V1)."""
    return models.get_weight(BACKBONES[backbone].weights)


def is_head(key: str) -> bool:
    """True for the classification head's keys, which a feature extractor never uses."""
    return key.startswith(("fc.", "classifier."))


class FeatureExtractor(nn.Module):
    """A torchvision backbone cut after its third stage, returning the output of each stage.

    ``frozen=True`` makes the teacher: no gradients, and eval mode that survives a parent's
    ``.train()`` (BatchNorm statistics of an ImageNet teacher must never move).
    """

    def __init__(self, backbone: str, state_dict: Mapping[str, Tensor] | None = None, frozen: bool = False):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; known: {', '.join(BACKBONES)}")
        spec = BACKBONES[backbone]
        network = build_network(backbone, state_dict)
        body = network.get_submodule(spec.body) if spec.body else network
        kept = IntermediateLayerGetter(body, return_layers={name: name for name in spec.stage_ends})
        stages, current = [], []
        self._kept_children: list[tuple[str, nn.Module]] = []  # (key prefix in the library network, module)
        for name, child in kept.named_children():
            current.append(child)
            self._kept_children.append((f"{spec.body}.{name}" if spec.body else name, child))
            if name in spec.stage_ends:
                stages.append(nn.Sequential(*current))
                current = []
        self.stages = nn.ModuleList(stages)
        self.backbone = backbone
        self.frozen = frozen
        self.channels = self._probe_channels()
        if frozen:
            self.requires_grad_(False)
            self.eval()

    def _probe_channels(self) -> tuple[int, ...]:
        """Channel counts of the three stages, read off the network rather than tabulated.

        The probe runs in eval mode: in train mode every BatchNorm would fold the probe's batch
        into its running statistics, and an ImageNet teacher would no longer be those weights.
        """
        was_training = self.training
        self.eval()
        with torch.no_grad():
            channels = tuple(f.shape[1] for f in self.forward(torch.zeros(1, 3, 64, 64)))
        self.train(was_training)
        return channels

    def network_state_dict(self) -> dict[str, Tensor]:
        """This extractor's parameters and buffers under the library network's own key names
        (``layer1.0.conv1.weight``, ``features.3.conv.0.0.weight``), to compare with its weights."""
        return {f"{prefix}.{key}": tensor for prefix, child in self._kept_children
                for key, tensor in child.state_dict().items()}

    def train(self, mode: bool = True) -> "FeatureExtractor":
        return super().train(mode and not self.frozen)

    def forward(self, images: Tensor, between: Callable[[int, Tensor], Tensor] | None = None) -> list[Tensor]:
        """Features after stages 1, 2, 3 (strides 4, 8, 16).

        ``between(i, feature)``, if given, transforms the output of stage ``i`` (0 or 1) before it
        enters the next stage; the returned features are the stages' own outputs.
        """
        features, x = [], images
        for i, stage in enumerate(self.stages):
            x = stage(x)
            features.append(x)
            if between is not None and i < len(self.stages) - 1:
                x = between(i, x)
        return features
