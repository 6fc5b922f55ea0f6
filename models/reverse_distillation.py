"""RD4AD student: a one-class bottleneck and a decoder that rebuilds the teacher's features.

Built from torchvision's own ResNet blocks (no copied network code), of the teacher's kind:
``BasicBlock`` for resnet18/34 (and MobileNetV2), ``Bottleneck`` for resnet50/wide_resnet50_2,
as RD4AD's de_resnet does. Each decoder stage first doubles the resolution with a transposed
convolution, then refines with residual blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from models.memory import MemoryFusion
from models.student import MemorySettings, StudentOutput


@dataclass(frozen=True)
class DecoderSpec:
    """RD4AD's choices per backbone: block kind, blocks per decoder stage (rebuilding teacher
    stages 3, 2, 1), blocks in the one-class embedding, and the Bottleneck width per group."""

    block: type[BasicBlock] | type[Bottleneck]
    stage_blocks: tuple[int, int, int]
    embed_blocks: int
    base_width: int = 64


DECODERS: dict[str, DecoderSpec] = {
    "resnet18": DecoderSpec(BasicBlock, (2, 2, 2), 2),
    "resnet34": DecoderSpec(BasicBlock, (3, 4, 6), 2),
    "resnet50": DecoderSpec(Bottleneck, (3, 4, 6), 3),
    "wide_resnet50_2": DecoderSpec(Bottleneck, (3, 4, 6), 3, base_width=128),  # mirrors its doubled width
    "mobilenet_v2": DecoderSpec(BasicBlock, (2, 2, 2), 2),  # ours: full-width blocks on its thin features
}


def _conv_bn_relu(c_in: int, c_out: int, stride: int, transposed: bool = False) -> nn.Sequential:
    conv = (nn.ConvTranspose2d(c_in, c_out, 2, stride=2, bias=False) if transposed
            else nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False))
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def _blocks(spec: DecoderSpec, c_in: int, c_out: int, count: int, stride: int = 1) -> list[nn.Module]:
    """``count`` residual blocks of ``spec.block`` from c_in to c_out channels, the first one strided."""
    if c_out % spec.block.expansion:
        raise ValueError(f"decoder channels {c_out} must be divisible by {spec.block.expansion}")
    planes = c_out // spec.block.expansion
    width = {"base_width": spec.base_width} if spec.block is Bottleneck else {}
    downsample = None
    if stride != 1 or c_in != c_out:
        downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
    first = spec.block(c_in, planes, stride=stride, downsample=downsample, **width)
    return [first, *(spec.block(c_out, planes, **width) for _ in range(count - 1))]


class OneClassBottleneck(nn.Module):
    """Multi-scale feature fusion + one-class embedding (RD4AD's OCBE).

    Stages 1 and 2 are strided down to stage 3's resolution, all three are concatenated, and
    residual blocks (the first one strided) squeeze them into a 2*C3-channel embedding at stride 32.
    """

    def __init__(self, channels: tuple[int, int, int], spec: DecoderSpec):
        super().__init__()
        c1, c2, c3 = channels
        self.align = nn.ModuleList([
            nn.Sequential(_conv_bn_relu(c1, c2, 2), _conv_bn_relu(c2, c3, 2)),
            _conv_bn_relu(c2, c3, 2),
            nn.Identity(),
        ])
        self.out_channels = 2 * c3
        self.embed = nn.Sequential(*_blocks(spec, 3 * c3, self.out_channels, spec.embed_blocks, stride=2))

    def forward(self, teacher_features: list[Tensor]) -> Tensor:
        aligned = [align(f) for align, f in zip(self.align, teacher_features)]
        return self.embed(torch.cat(aligned, dim=1))


class RDStudent(nn.Module):
    """Bottleneck + decoder: rebuilds teacher stages 3, 2, 1 (strides 16, 8, 4) from the embedding.

    With memory, the decoder outputs that mirror teacher stages 3 and 2 read a memory each and the
    fused feature feeds the next decoder stage; those outputs imitate that teacher stage, so each
    memory is queried in the same space its values are taught to rebuild (``memory_targets``).
    """

    def __init__(self, backbone: str, teacher_channels: tuple[int, int, int], memory: MemorySettings | None):
        super().__init__()
        spec = DECODERS[backbone]
        self.bottleneck = OneClassBottleneck(teacher_channels, spec)
        outputs = teacher_channels[::-1]
        inputs = (self.bottleneck.out_channels, *outputs[:-1])
        self.decoder = nn.ModuleList(
            nn.Sequential(_conv_bn_relu(c_in, c_out, 2, transposed=True), *_blocks(spec, c_out, c_out, n))
            for c_in, c_out, n in zip(inputs, outputs, spec.stage_blocks))
        self.memory_targets: tuple[int, ...] = (2, 1) if memory else ()
        self.memories = nn.ModuleList(
            MemoryFusion(teacher_channels[t], memory.slots, memory.temperature) for t in self.memory_targets)

    def forward(self, images: Tensor, teacher_features: list[Tensor]) -> StudentOutput:
        x = self.bottleneck(teacher_features)
        decoded, recall_weights = [], []
        for i, stage in enumerate(self.decoder):
            x = stage(x)
            decoded.append(x)
            if i < len(self.memories):
                x, weights = self.memories[i](x)
                recall_weights.append(weights)
        return StudentOutput(decoded[::-1], recall_weights)
