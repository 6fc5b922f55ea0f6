"""The Normality Recall (NR) memory: L learnable key/value pairs that store normal features.

A read is attention, softmax(q k^T / T) v, with q the L2-normalised queries and k the
L2-normalised rows addressed (the keys for a student's recall, the values themselves for an
exemplar's rebuild). On a GPU every operator of a training step is at least one kernel launch, and
the memory's arithmetic is small, so it is written for few operators: the queries, keys and
values are normalised together by one operator chain with a short backward (:func:`unit_vectors`),
and on CUDA the read is one ``scaled_dot_product_attention``, one fused operator forward and one
backward. On the CPU, where launches cost nothing, the read is the formula's two matrix products
around a softmax, which measured 1.2x to 1.5x faster there than the CPU's attention kernel
(benchmarks/memory_read.py); a test holds both reads to the formula.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.registry import FUSION_MODES, MemoryStage

# F.normalize's default: a vector shorter than this is divided by it instead of by its length.
UNIT_EPS = 1e-12


def unit_and_length(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """x / max(||x||, eps) along ``dim``, as F.normalize computes it, and the max(||x||, eps)."""
    length = torch.linalg.vector_norm(x, dim=dim, keepdim=True).clamp_min(UNIT_EPS)
    return x / length, length


def unit_backward(grad: Tensor, unit: Tensor, length: Tensor, dim: int) -> Tensor:
    """The gradient through :func:`unit_and_length`: (g - y <g, y>) / max(||x||, eps), 4 operators
    where autograd's chain through F.normalize takes 13. It agrees with F.normalize's except for
    vectors with 0 < ||x|| < eps, where F.normalize treats the length as a constant."""
    radial = (grad * unit).sum(dim, keepdim=True)
    return torch.addcmul(grad, unit, radial, value=-1).div_(length)


class _UnitVectors(torch.autograd.Function):
    """:func:`unit_and_length` with :func:`unit_backward` as its backward."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int) -> Tensor:
        unit, length = unit_and_length(x, dim)
        ctx.save_for_backward(unit, length)
        ctx.dim = dim
        return unit

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        unit, length = ctx.saved_tensors
        return unit_backward(grad, unit, length, ctx.dim), None


def unit_vectors(x: Tensor, dim: int = -1) -> Tensor:
    """``x`` L2-normalised along ``dim``: F.normalize(x, dim=dim) in value, with a shorter backward."""
    return _UnitVectors.apply(x, dim)


def positions(features: Tensor) -> Tensor:
    """The feature vectors of ``features`` [B, C, H, W] as rows [B*H*W, C], row b*H*W + y*W + x
    holding position (b, y, x): a view in channels_last, one copy into it otherwise."""
    return features.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).view(-1, features.shape[1])


def as_feature_map(rows: Tensor, like: Tensor) -> Tensor:
    """Rows [B*H*W, C] back in the shape of ``like`` [B, C, H, W] (channels_last strides, a view)."""
    b, c, h, w = like.shape
    return rows.view(b, h, w, c).permute(0, 3, 1, 2)


def read_by_attention(queries: Tensor, rows: Tensor, values: Tensor, temperature: float) -> Tensor:
    """softmax(q r^T / T) v for unit ``queries`` [S, C] addressing unit ``rows`` [L, C], reading
    ``values`` [L, C]: [S, C]. One fused operator forward and one backward: the S queries form one
    attention sequence (they all read the same L rows, so no batch dimension), C is the head size."""
    read = F.scaled_dot_product_attention(queries[None, None], rows[None, None], values[None, None],
                                          scale=1.0 / temperature)
    return read.view(queries.shape)


def read_by_products(queries: Tensor, rows: Tensor, values: Tensor, temperature: float) -> Tensor:
    """The same read as :func:`read_by_attention` as the formula says it: two matrix products
    around a softmax (what the tests and benchmarks/memory_read.py compare it with)."""
    return torch.softmax(queries @ rows.t() / temperature, dim=-1) @ values


# The read each device type runs (see the module docstring); any other device reads by attention.
READ_BY_DEVICE = {"cpu": read_by_products, "cuda": read_by_attention}


def read(queries: Tensor, rows: Tensor, values: Tensor, temperature: float) -> Tensor:
    """softmax(q r^T / T) v (see :func:`read_by_attention`) by the faster read on the queries' device."""
    return READ_BY_DEVICE.get(queries.device.type, read_by_attention)(queries, rows, values, temperature)


class MemoryRead(NamedTuple):
    """What one recall read: the student features that addressed the memory, and its keys and
    values as unit rows [L, C]."""

    queries: Tensor
    unit_keys: Tensor
    unit_values: Tensor
    values: Tensor  # the values as read (float32), for the rebuild to read the same view


class NormalityMemory(nn.Module):
    """L keys and L values of C channels, both trained.

    Student features address the keys and read back a mix of values (:meth:`recall`); exemplar
    teacher features address the values themselves and must be rebuilt from them
    (:meth:`rebuild`), which is how the values learn what normal features look like.
    Addressing is a softmax over cosine similarity divided by ``temperature``: cosine lies in
    [-1, 1], so without a small temperature the weights are nearly uniform for any L.
    All of it runs in float32, even under autocast: with a small temperature, bfloat16 rounding of
    the cosines would visibly change which slots are read.

    Keys and values are one parameter, ``rows`` (the L keys, then the L values), so that they are
    normalised together and the optimiser updates them in one step; :attr:`keys` and
    :attr:`values` are views of it. Checkpoints holding separate ``keys`` and ``values`` load.
    """

    def __init__(self, channels: int, slots: int, temperature: float):
        super().__init__()
        # Keys drawn first, then values: the numbers separate parameters were initialised with.
        self.rows = nn.Parameter(torch.cat([torch.randn(slots, channels), torch.randn(slots, channels)]))
        self.slots = slots
        self.temperature = temperature

    @property
    def keys(self) -> Tensor:
        return self.rows[: self.slots]

    @property
    def values(self) -> Tensor:
        return self.rows[self.slots:]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "keys" in state_dict and prefix + "values" in state_dict:  # written before rows existed
            state_dict[prefix + "rows"] = torch.cat([state_dict.pop(prefix + "keys"), state_dict.pop(prefix + "values")])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def recall(self, features: Tensor) -> tuple[Tensor, MemoryRead]:
        """Normal features [B, C, H, W] recalled for ``features`` [B, C, H, W] through the keys
        (channels_last strides), and what the read used: the loss reuses its unit rows."""
        with torch.autocast(features.device.type, enabled=False):
            queries = positions(features.float())
            rows = self.rows.float()
            unit_queries, unit_keys, unit_values = unit_vectors(torch.cat([queries, rows])).split(
                [queries.shape[0], self.slots, self.slots])
            values = rows[self.slots:]
            recalled = read(unit_queries, unit_keys, values, self.temperature)
        return as_feature_map(recalled, features), MemoryRead(features, unit_keys, unit_values, values)

    def rebuild(self, unit_targets: Tensor, memory_read: MemoryRead) -> Tensor:
        """``unit_targets`` [S, C] (unit rows, e.g. :func:`positions` of feature maps) rebuilt as a
        mix of values addressed by the unit values of ``memory_read`` (this step's recall): [S, C]."""
        with torch.autocast(unit_targets.device.type, enabled=False):
            return read(unit_targets, memory_read.unit_values, memory_read.values, self.temperature)

    def _weights(self, unit_queries: Tensor, rows: Tensor) -> Tensor:
        return torch.softmax(unit_queries @ F.normalize(rows.float(), dim=1).t() / self.temperature, dim=-1)

    @torch.no_grad()
    def recall_weights(self, features: Tensor) -> Tensor:
        """The weights [B*H*W, L] :meth:`recall` puts on each key for ``features`` [B, C, H, W]
        (for logging; row b*H*W + y*W + x is position (b, y, x))."""
        return self._weights(F.normalize(positions(features.float()), dim=1), self.keys)

    @torch.no_grad()
    def rebuild_weights(self, unit_targets: Tensor) -> Tensor:
        """The weights [S, L] :meth:`rebuild` puts on each value for ``unit_targets`` [S, C] (for logging)."""
        return self._weights(unit_targets, self.values)


def normalised_entropy(weights: Tensor) -> Tensor:
    """Mean entropy of addressing weights [..., L] divided by log(L): 1 = uniform, 0 = one slot.

    A memory whose weights sit near 1 does not select anything: every query reads the same mix.
    """
    slots = weights.shape[-1]
    if slots == 1:
        return weights.new_zeros(())
    entropy = -(weights * weights.clamp_min(1e-12).log()).sum(-1)
    return entropy.mean() / math.log(slots)


@dataclass(frozen=True)
class MemorySettings:
    """Size, read temperature, places and fusion of the NR memories a student holds."""

    slots: int
    temperature: float
    stages: tuple[MemoryStage, ...]
    fusion: str = "concat"


class MemoryFusion(nn.Module):
    """Reads a NormalityMemory with a feature map and fuses the recalled normal feature back in.

    ``concat`` (the paper's fusion): [feature, recalled] through a 1x1 conv + BN + ReLU back to C
    channels. ``add``: a residual sum feature + recalled, with no parameters. Either way the next
    network stage receives a tensor of the shape it was built for.
    """

    def __init__(self, channels: int, slots: int, temperature: float, mode: str = "concat"):
        super().__init__()
        if mode not in FUSION_MODES:
            raise ValueError(f"fusion mode must be one of {FUSION_MODES}, not {mode!r}")
        self.memory = NormalityMemory(channels, slots, temperature)
        self.mode = mode
        self.fuse = (nn.Sequential(nn.Conv2d(2 * channels, channels, 1, bias=False),
                                   nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
                     if mode == "concat" else None)

    def forward(self, features: Tensor) -> tuple[Tensor, MemoryRead]:
        recalled, memory_read = self.memory.recall(features)
        recalled = recalled.to(features.dtype)
        if self.fuse is None:
            return features + recalled, memory_read
        return self.fuse(torch.cat([features, recalled], dim=1)), memory_read
