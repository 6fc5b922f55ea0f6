"""What the models offer, by name: the one list of backbones, loss forms, map forms, fusion modes
and memory places that the config's allowed values come from.

Plain Python on purpose: the configuration reads this module to check a value and answer
``--help`` without loading torch. The modules that build networks, losses and maps look their
entries up here, so a name exists once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

# The scripts' methods: "st" (trainRM_ST.py, an STPM student) and "rd" (trainRM_RD.py, an RD4AD student).
METHODS: tuple[str, ...] = ("st", "rd")


@dataclass(frozen=True)
class BackboneSpec:
    """One teacher network: torchvision's builder of the same name, its pinned weights, and where its
    three stages end."""

    weights: str  # torchvision weights enum and member: the weights the papers used, never DEFAULT
    body: str  # attribute that holds the layers ("" = the network itself)
    stage_ends: tuple[str, str, str]  # child names that end stage 1, 2, 3 (strides 4, 8, 16)


_RESNET_STAGES = ("layer1", "layer2", "layer3")
BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec("ResNet18_Weights.IMAGENET1K_V1", "", _RESNET_STAGES),
    "resnet34": BackboneSpec("ResNet34_Weights.IMAGENET1K_V1", "", _RESNET_STAGES),
    "resnet50": BackboneSpec("ResNet50_Weights.IMAGENET1K_V1", "", _RESNET_STAGES),
    "wide_resnet50_2": BackboneSpec("Wide_ResNet50_2_Weights.IMAGENET1K_V1", "", _RESNET_STAGES),
    # MobileNetV2's inverted-residual blocks 3, 6 and 13 are the last ones at strides 4, 8 and 16.
    "mobilenet_v2": BackboneSpec("MobileNet_V2_Weights.IMAGENET1K_V1", "features", ("3", "6", "13")),
}

# L_KD forms (models/losses.py): STPM's per-position squared distance, RD4AD's whole-map cosine.
DISTILLATION_LOSSES: tuple[str, ...] = ("stpm", "rd4ad")
# How per-layer maps make the anomaly map (models/anomaly_map.py): STPM's product, RD4AD's sum.
COMBINE_MODES: tuple[str, ...] = ("product", "sum")
# How a recalled feature joins the student (models/memory.py).
FUSION_MODES: tuple[str, ...] = ("concat", "add")

# A place that can hold a memory: a teacher stage number (1, 2, 3) or "bottleneck" (RD only).
MemoryStage = Union[int, str]
# Where each student can hold one: ST after its stages 1 and 2 (stage 3's output feeds nothing
# further); RD at its bottleneck and after the decoder stages that rebuild teacher stages 3 and 2
# (stage 1's output is the last one).
MEMORY_STAGES: dict[str, tuple[MemoryStage, ...]] = {"st": (1, 2), "rd": ("bottleneck", 3, 2)}

# Display names: the paper's method with memory, the baseline it builds on without.
_NAMES = {("st", True): "MemKD-ST", ("st", False): "STPM", ("rd", True): "MemKD-RD", ("rd", False): "RD4AD"}


def method_name(method: str, memory_enabled: bool) -> str:
    """'MemKD-ST', 'STPM', 'MemKD-RD' or 'RD4AD'."""
    return _NAMES[(method, memory_enabled)]
