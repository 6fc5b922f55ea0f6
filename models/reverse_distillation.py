"""RD4AD student: a one-class bottleneck and a decoder that rebuilds the teacher's features.

Built from torchvision's own ResNet blocks (no copied network code), of the teacher's kind, as
RD4AD's official code builds it (hq-deng/RD4AD, models/resnet.py ``BN_layer`` and
models/de_resnet.py ``ResNet``): ``BasicBlock`` for resnet18/34 (and, ours, MobileNetV2),
``Bottleneck`` for resnet50/wide_resnet50_2. The first block of each decoder stage doubles the
resolution inside the block: its strided 3x3 convolution becomes a 2x2 transposed convolution, and
its shortcut a 2x2 transposed convolution + BatchNorm. Every Conv2d of bottleneck and decoder is
Kaiming-normal initialised (fan_out, ReLU), BatchNorms at weight 1 and bias 0, as there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from models.memkd import StudentOutput
from models.memory import MemoryFusion, MemoryRead, MemorySettings
from models.registry import MEMORY_STAGES, MemoryStage


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
    "resnet34": DecoderSpec(BasicBlock, (3, 4, 6), 3),
    "resnet50": DecoderSpec(Bottleneck, (3, 4, 6), 3),
    "wide_resnet50_2": DecoderSpec(Bottleneck, (3, 4, 6), 3, base_width=128),  # mirrors its doubled width
    "mobilenet_v2": DecoderSpec(BasicBlock, (2, 2, 2), 2),  # ours: full-width blocks on its thin features
}


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def _upsampling(c_in: int, c_out: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(c_in, c_out, kernel_size=2, stride=2, bias=False)


def _blocks(spec: DecoderSpec, c_in: int, c_out: int, count: int, stride: int = 1,
            upsample: bool = False) -> list[nn.Module]:
    """``count`` residual blocks of ``spec.block`` from c_in to c_out channels.

    The first block is strided by ``stride`` (encoder side) or, with ``upsample``, doubles the
    resolution through transposed convolutions (decoder side, RD4AD's deconv2x2).
    """
    if c_out % spec.block.expansion:
        raise ValueError(f"decoder channels {c_out} must be divisible by {spec.block.expansion}")
    planes = c_out // spec.block.expansion
    width = {"base_width": spec.base_width} if spec.block is Bottleneck else {}
    shortcut = None
    if upsample:
        shortcut = nn.Sequential(_upsampling(c_in, c_out), nn.BatchNorm2d(c_out))
    elif stride != 1 or c_in != c_out:
        shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
    first = spec.block(c_in, planes, stride=stride, downsample=shortcut, **width)
    if upsample:  # the block's (would-be strided) 3x3 convolution becomes the upsampling one
        name = "conv1" if spec.block is BasicBlock else "conv2"
        conv = getattr(first, name)
        setattr(first, name, _upsampling(conv.in_channels, conv.out_channels))
    return [first, *(spec.block(c_out, planes, **width) for _ in range(count - 1))]


def _rd4ad_init(module: nn.Module) -> None:
    """RD4AD's initialisation: Kaiming-normal (fan_out, ReLU) Conv2d weights, BatchNorm at 1 and 0.

    Transposed convolutions are not Conv2d and keep PyTorch's default, as in the official code.
    """
    for m in module.modules():
        if type(m) is nn.Conv2d:
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


class OneClassBottleneck(nn.Module):
    """Multi-scale feature fusion + one-class embedding (RD4AD's OCBE, ``BN_layer``).

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

    With memory, each place in ``memory.stages`` reads a memory and the fused feature feeds on:
    the decoder outputs that mirror teacher stages 3 and 2 (queried in the space of that teacher
    stage, which their values learn to rebuild), and ``bottleneck``, the one-class embedding (as
    the older unofficial code did; its values learn to rebuild the exemplars' embedding).
    """

    MEMORY_STAGES: tuple[MemoryStage, ...] = MEMORY_STAGES["rd"]

    def __init__(self, backbone: str, teacher_channels: tuple[int, int, int], memory: MemorySettings | None):
        super().__init__()
        spec = DECODERS[backbone]
        self.bottleneck = OneClassBottleneck(teacher_channels, spec)
        outputs = teacher_channels[::-1]
        inputs = (self.bottleneck.out_channels, *outputs[:-1])
        self.decoder = nn.ModuleList(
            nn.Sequential(*_blocks(spec, c_in, c_out, n, upsample=True))
            for c_in, c_out, n in zip(inputs, outputs, spec.stage_blocks))
        _rd4ad_init(self)
        self.memory_stages: tuple[MemoryStage, ...] = tuple(memory.stages) if memory else ()
        channels = {"bottleneck": self.bottleneck.out_channels, 1: teacher_channels[0], 2: teacher_channels[1],
                    3: teacher_channels[2]}
        self.memories = nn.ModuleList(
            MemoryFusion(channels[s], memory.slots, memory.temperature, memory.fusion) for s in self.memory_stages)
        # Which memory_targets never change for an image: the teacher stages', not the bottleneck's.
        self.fixed_memory_targets = tuple(stage != "bottleneck" for stage in self.memory_stages)

    def memory_targets(self, teacher_features: list[Tensor]) -> list[Tensor]:
        """What each memory's values learn to rebuild: the teacher stage it mirrors, or for
        ``bottleneck`` the current embedding of the teacher features (no gradient into the bottleneck)."""
        targets = []
        for stage in self.memory_stages:
            if stage == "bottleneck":
                with torch.no_grad():
                    targets.append(self.bottleneck(teacher_features))
            else:
                targets.append(teacher_features[stage - 1])
        return targets

    def _fuse(self, place: MemoryStage, x: Tensor, reads: list[MemoryRead]) -> Tensor:
        if place not in self.memory_stages:
            return x
        x, memory_read = self.memories[self.memory_stages.index(place)](x)
        reads.append(memory_read)
        return x

    def forward(self, images: Tensor, teacher_features: list[Tensor]) -> StudentOutput:
        reads: list[MemoryRead] = []
        x = self._fuse("bottleneck", self.bottleneck(teacher_features), reads)
        decoded = []
        for i, stage in enumerate(self.decoder):
            x = stage(x)
            decoded.append(x)
            if i < len(self.decoder) - 1:
                x = self._fuse(len(self.decoder) - i, x, reads)
        return StudentOutput(decoded[::-1], reads)
