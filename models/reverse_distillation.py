"""RD4AD student: a one-class bottleneck and a decoder that rebuilds the teacher's features.

The decoder is built from torchvision's own ResNet ``Bottleneck`` block (no copied network code);
each stage first doubles the resolution with a transposed convolution, then refines.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck

from models.memory import MemoryFusion
from models.student import MemorySettings, StudentOutput

# Residual blocks per decoder stage (the stage rebuilding teacher stage 3, 2, 1), as in RD4AD's
# de_resnet: [3, 4, 6] for the deep ResNets, [2, 2, 2] for the small ones.
DECODER_BLOCKS = {"resnet18": (2, 2, 2), "resnet34": (3, 4, 6), "resnet50": (3, 4, 6),
                  "wide_resnet50_2": (3, 4, 6), "mobilenet_v2": (2, 2, 2)}
# Bottleneck width per group: wide_resnet50_2 doubles it, and its decoder mirrors that.
BLOCK_WIDTH = {"wide_resnet50_2": 128}


def _conv_bn_relu(c_in: int, c_out: int, stride: int, transposed: bool = False) -> nn.Sequential:
    conv = (nn.ConvTranspose2d(c_in, c_out, 2, stride=2, bias=False) if transposed
            else nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False))
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def _residual_blocks(channels: int, count: int, base_width: int) -> list[nn.Module]:
    if channels % Bottleneck.expansion:
        raise ValueError(f"decoder channels {channels} must be divisible by {Bottleneck.expansion}")
    return [Bottleneck(channels, channels // Bottleneck.expansion, base_width=base_width) for _ in range(count)]


class OneClassBottleneck(nn.Module):
    """Multi-scale feature fusion + one-class embedding (RD4AD's OCBE).

    Stages 1 and 2 are strided down to stage 3's resolution, all three are concatenated, and a
    strided Bottleneck block squeezes them into a compact 2*C3-channel embedding at stride 32.
    """

    def __init__(self, channels: tuple[int, int, int], base_width: int = 64):
        super().__init__()
        c1, c2, c3 = channels
        self.align = nn.ModuleList([
            nn.Sequential(_conv_bn_relu(c1, c2, 2), _conv_bn_relu(c2, c3, 2)),
            _conv_bn_relu(c2, c3, 2),
            nn.Identity(),
        ])
        self.out_channels = 2 * c3
        downsample = nn.Sequential(nn.Conv2d(3 * c3, self.out_channels, 1, stride=2, bias=False),
                                   nn.BatchNorm2d(self.out_channels))
        self.embed = Bottleneck(3 * c3, self.out_channels // Bottleneck.expansion, stride=2,
                                downsample=downsample, base_width=base_width)

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
        base_width = BLOCK_WIDTH.get(backbone, 64)
        self.bottleneck = OneClassBottleneck(teacher_channels, base_width)
        outputs = teacher_channels[::-1]
        inputs = (self.bottleneck.out_channels, *outputs[:-1])
        self.decoder = nn.ModuleList(
            nn.Sequential(_conv_bn_relu(c_in, c_out, 2, transposed=True), *_residual_blocks(c_out, n, base_width))
            for c_in, c_out, n in zip(inputs, outputs, DECODER_BLOCKS[backbone]))
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
