"""Where a training step and an evaluation batch spend their time, from torch.profiler.

    python benchmarks/profile_step.py [--methods st,rd] [--backbone mobilenet_v2] [--size 256] [--batch 16] [--steps 3]
                                      [--threads 1]

Runs the engine's step (teacher features from the cache, ``model.loss``, backward, optimiser
step) and ``anomaly_map`` with memory on, under torch.profiler, and prints each operator group's
share of the CPU time: convolutions (the networks' and the memory's 1x1 ones), batch norms and
activations (forward and backward), the softmax / normalisation / product / sum arithmetic of the
memory read and the losses, layout copies and the optimiser. Also times, outside the profiler
and by this process's CPU time (one thread by default, so other jobs on the machine barely move
it), what the teacher-feature cache saves per step: one teacher forward pass; and, per memory,
what each part of its work costs in a step (the recall, the fusion, the exemplar rebuild with its
losses) and what the entropies logged once per epoch cost. Finally counts the operators one
training step runs, memory off and on (views excluded), with each of the memory's two reads: on a
GPU each operator is at least one kernel launch, so where a step is small enough to be
launch-bound, step time follows this count rather than the arithmetic; a GPU runs the attention
read, the CPU the products read.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.train_speed import speed_config, step_functions  # noqa: E402
from models.registry import method_name  # noqa: E402
from engine.model import build_run_model  # noqa: E402
from models.losses import normality_embedding_loss, orthogonality_loss  # noqa: E402
from models.memory import READ_BY_DEVICE, read_by_attention, read_by_products  # noqa: E402
from utils.device import to_device  # noqa: E402

# Operator name fragments -> group, first match wins; "autograd::" wrappers are bookkeeping.
GROUPS = (
    ("convolution", ("convolution", "conv2d", "mkldnn_conv", "conv_transpose", "slow_conv")),
    ("batch norm", ("batch_norm",)),
    ("activations", ("relu", "hardtanh", "threshold", "clamp")),
    ("optimiser", ("_foreach", "sgd", "adam", "zero_", "lerp", "addcdiv", "addcmul", "sqrt")),
    ("softmax, normalise, products, sums (memory read, losses, residual adds)",
     ("softmax", "norm", "div", "mul", "sub", "pow", "sum", "mean", "log", "mm", "cat", "masked_fill", "neg", "exp",
      "cosine", "add")),
    ("layout copies", ("copy_", "contiguous", "clone", "index")),
)


def group_of(name: str) -> str:
    lowered = name.lower()
    for group, fragments in GROUPS:
        if any(fragment in lowered for fragment in fragments):
            return group
    return "other"


def shares(step, repeats: int) -> dict[str, float]:
    """Self CPU time per operator group over ``repeats`` calls of ``step``, as fractions."""
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            step()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if not event.key.startswith("autograd::"):
            totals[group_of(event.key)] += event.self_cpu_time_total
    whole = sum(totals.values())
    return {group: value / whole for group, value in sorted(totals.items(), key=lambda kv: -kv[1])}


class _OperatorCount(TorchDispatchMode):
    """Counts the ATen operators that reach a backend kernel, views and aliases excluded."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (getattr(func, "is_view", False) or func.overloadpacket in (torch.ops.aten.detach, torch.ops.aten.alias)):
            self.count += 1
        return func(*args, **(kwargs or {}))


def operators_per_step(step) -> int:
    """How many computing operators (forward, backward and optimiser) one call of ``step`` runs."""
    step()
    with _OperatorCount() as counter:
        step()
    return counter.count


def _median_time(step, clock, repeats: int = 5) -> float:
    step()
    times = []
    for _ in range(repeats):
        started = clock()
        step()
        times.append(clock() - started)
    return statistics.median(times)


def memory_pieces(model, images: torch.Tensor, exemplars: int, clock) -> list[str]:
    """Per memory, forward + backward time of each part of its work in a training step, on the
    shapes the step has: the recall (one normalisation of queries, keys and values; the read), the
    fusion (concatenation, 1x1 convolution, batch norm, ReLU) and the exemplar rebuild with L_NM
    and L_Orth; and the logged entropies, which run once per epoch, not per step."""
    lines = []
    teacher = model.teacher_features(images)
    model.set_exemplars(images[:exemplars])
    targets = model._exemplar_unit_targets()
    for fusion, feature, target in zip(model.student.memories, model.student.memory_targets(teacher), targets):
        queries = feature.detach().clone().requires_grad_()
        memory = fusion.memory

        def recall():
            recalled, _ = memory.recall(queries)
            recalled.sum().backward()

        def fuse():
            if fusion.fuse is not None:
                fusion.fuse(torch.cat([queries, queries.detach()], dim=1)).sum().backward()

        def rebuild():
            _, memory_read = memory.recall(queries.detach())
            (normality_embedding_loss(memory.rebuild(target, memory_read), target)
             + orthogonality_loss(memory_read.unit_keys, memory_read.unit_values)).backward()

        timed = {name: _median_time(step, clock) for name, step in
                 (("recall", recall), ("fusion conv+BN+ReLU", fuse), ("exemplar rebuild + L_NM + L_Orth", rebuild))}
        shape = "x".join(str(d) for d in feature.shape)
        lines.append(f"  memory on {shape}: " + ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in timed.items()))
    lines.append(f"  logged entropies, once per epoch: {1000 * _median_time(model.memory_entropies, clock):.0f} ms")
    return lines


def operator_counts(method: str, backbone: str, batch: int, size: int, device: torch.device) -> dict[str, int]:
    """Operators per training step: memory ``off``, and on with each read the memory has,
    ``attention`` (what a GPU runs: one fused operator each way) and ``products`` (what the CPU
    runs, faster there)."""
    counts = {"off": operators_per_step(step_functions(speed_config(method, backbone, memory=False, fast=True),
                                                       method, batch, size, device)[0])}
    on = speed_config(method, backbone, memory=True, fast=True)
    original = dict(READ_BY_DEVICE)
    try:
        for name, reader in (("attention", read_by_attention), ("products", read_by_products)):
            READ_BY_DEVICE[device.type] = reader
            counts[name] = operators_per_step(step_functions(on, method, batch, size, device)[0])
    finally:
        READ_BY_DEVICE.update(original)
    return counts


def describe_counts(method: str, counts: dict[str, int]) -> list[str]:
    """The printed line of :func:`operator_counts`, with each memory read's ratio to the baseline."""
    base, memory = method_name(method, False), method_name(method, True)
    return [f"  operators per training step (views excluded): {base} {counts['off']}, "
            f"{memory} {counts['attention']} ({counts['attention'] / counts['off']:.2f}x) with the read a GPU runs "
            f"(attention), {counts['products']} ({counts['products'] / counts['off']:.2f}x) with the CPU's (products)"]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="st,rd")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    device = torch.device("cpu")
    for method in (m for m in args.methods.split(",") if m):
        config = speed_config(method, args.backbone, memory=True, fast=True)
        print(f"{args.backbone}, {args.size} px, batch {args.batch}, {args.steps} profiled steps, CPU, "
              f"{torch.get_num_threads()} threads; memory on, teacher-feature cache on, "
              f"channels_last {str(config.train.channels_last).lower()}")
        train_step, map_step = step_functions(config, method, args.batch, args.size, device)
        for name, step in (("training step", train_step), ("anomaly maps", map_step)):
            found = shares(step, args.steps)
            print(f"{method_name(method, True)} {name}: " + ", ".join(f"{g} {100 * s:.0f}%" for g, s in found.items()))
        model = build_run_model(config.replace({"train.batch_size": args.batch}))
        images = to_device(torch.randn(args.batch, 3, args.size, args.size), device, config.train.channels_last)
        model.teacher_features(images)
        started = clock()
        model.teacher_features(images)
        teacher = clock() - started
        train_step()
        started = clock()
        train_step()
        step = clock() - started
        print(f"  one teacher forward pass (what the cache saves per step): {teacher:.2f} s; "
              f"the cached step itself: {step:.2f} s ({'CPU' if args.threads == 1 else 'wall'} time)")
        model.train()
        print("\n".join(memory_pieces(model, images, min(config.memory.exemplars, args.batch), clock)))
        print("\n".join(describe_counts(method, operator_counts(method, args.backbone, args.batch, args.size, device))))


if __name__ == "__main__":
    main(sys.argv[1:])
