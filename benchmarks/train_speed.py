"""Training and anomaly-map throughput, memory off vs on, the engine's speed path vs the plain one.

    python benchmarks/train_speed.py [--backbone mobilenet_v2] [--size 256] [--batch 16] [--steps 5] [--rounds 3]
                                     [--methods st,rd] [--threads N] [--clock wall|cpu] [--device auto]

For ST and RD, times ``--steps`` optimiser steps of the engine's own code (the teacher-feature
cache's lookup, ``model.loss``, backward, step) and ``anomaly_map`` batches on random images,
after three warm-up steps, for four variants: memory off and on, each on the engine's speed path
(``train.feature_cache=float32``, batch norms folded for maps, ``train.channels_last`` as
config.yaml has it unless given as a trailing ``key=value``: models/folding.py) and on the code path before the speed work (none of it). Variants alternate within each of ``--rounds`` rounds and the table shows
medians over rounds: these machines are shared and noisy, so compare ratios measured in one run,
not seconds across runs. ``--clock cpu`` (with ``--threads 1``) times by this process's CPU time
instead of the wall clock: figures that other jobs on the machine barely move, since a single
thread never waits for a descheduled partner. ``memory cost`` is the training step time with memory over without, on
the same path; ``speed-up`` is the speed path over the plain one. The teacher is random: speed
does not depend on weights. On CUDA see benchmarks/gpu_speed.py.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from models.registry import method_name  # noqa: E402
from engine.model import build_run_model  # noqa: E402
from models.folding import inference_copy, scoring_through  # noqa: E402
from engine.config import RunSettings, load_config  # noqa: E402
from utils.device import autocast, memory_format, select_device, to_device, tune_for  # noqa: E402
from engine.feature_cache import TeacherFeatureCache  # noqa: E402
from engine.training import begin_step, build_optimizer, loss_function  # noqa: E402


class RandomImages(Dataset):
    """``count`` seeded random images of ``size`` px, as dataset items."""

    def __init__(self, count: int, size: int):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(count, 3, size, size, generator=generator)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index]}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def speed_config(method: str, backbone: str, memory: bool, fast: bool, extra: list[str] = ()) -> RunSettings:
    """The run settings of a variant: the engine's speed path (the teacher-feature cache; batch norms
    folded for maps; ``train.channels_last`` as config.yaml or ``extra`` set it) or none of it.
    The speed path is on exactly when the cache is (:func:`on_speed_path`)."""
    config = load_config(method, [f"model.backbone={backbone}", "model.pretrained=false",
                                  f"memory.enabled={str(memory).lower()}", "data.num_workers=0", *extra])
    if fast:
        return config.replace({"train.feature_cache": "float32"})
    return config.replace({"train.feature_cache": "off", "train.channels_last": False})


def on_speed_path(config: RunSettings) -> bool:
    """Whether ``config`` is a speed-path variant of :func:`speed_config`."""
    return config.train.feature_cache != "off"


def step_functions(config: RunSettings, method: str, batch: int, size: int,
                   device: torch.device) -> tuple[Callable[[], None], Callable[[], None]]:
    """(one training step, one batch of anomaly maps) as the engine runs them for ``config``, the
    step compiled as ``train.compile`` says (engine/training.py; maps are never compiled)."""
    config = config.replace({"train.batch_size": batch})
    model = build_run_model(config).to(device)
    fast = on_speed_path(config)
    tune_for(device)
    dataset = RandomImages(batch, size)
    images = to_device(dataset.images, device, config.train.channels_last)
    indices = torch.arange(batch)
    model.set_exemplars(images[: min(config.memory.exemplars, batch)])
    cache = TeacherFeatureCache.fill(model.teacher_features, dataset, model.teacher.channels, size, config.train,
                                     config.data.num_workers, device,
                                     lambda x: to_device(x, device, config.train.channels_last))
    optimizer = build_optimizer(model.trainable_parameters(), config.train)
    losses_of = loss_function(model, config.train, device)

    def train_step() -> None:
        model.train()
        begin_step(config.train, device)
        with autocast(config.train.amp, device):
            teacher = cache.lookup(indices, images, model.teacher_features) if cache else None
            loss = losses_of(images, teacher)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()  # the engine reads every loss: a synchronisation point on CUDA

    # As engine/evaluation.py scores on the speed path: through folded copies of teacher and student
    # (folded_for_inference), made once per evaluated dataset there, so once here and reused.
    layout = memory_format(config.train.channels_last)
    scoring_student = inference_copy(model.student, layout) if fast else model.student
    scoring_teacher = inference_copy(model.teacher, layout) if fast else None

    @torch.no_grad()
    def map_step() -> None:
        model.eval()
        with autocast(config.train.amp, device), scoring_through(model, scoring_student, scoring_teacher):
            model.anomaly_map(images).float().cpu()

    return train_step, map_step


def images_per_second(step: Callable[[], None], steps: int, batch: int, device: torch.device,
                      clock: Callable[[], float] = time.perf_counter) -> float:
    """Throughput of ``steps`` calls of ``step`` after three warm-up calls (the convolution
    library builds its kernels for each new shape in the first steps)."""
    for _ in range(3):
        step()
    synchronize(device)
    started = clock()
    for _ in range(steps):
        step()
    synchronize(device)
    return steps * batch / (clock() - started)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", default="st,rd")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--clock", default="wall", choices=("wall", "cpu"))
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("overrides", nargs="*", help="key=value for every variant, e.g. train.channels_last=true")
    args = parser.parse_args(argv)
    device = select_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and (device.type == "cuda" or torch.get_num_threads() != 1):
        parser.error("--clock cpu measures one CPU thread: use it with --threads 1 on the CPU")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"{args.backbone}, {args.size} px, batch {args.batch}, {args.steps} timed steps x {args.rounds} rounds, "
          f"device {device}, {torch.get_num_threads()} CPU threads, {args.clock} clock, torch {torch.__version__}")
    print(f"{'variant':<32}{'train img/s':>12}{'memory cost':>13}{'speed-up':>10}{'maps img/s':>12}{'speed-up':>10}")
    for method in (m for m in args.methods.split(",") if m):
        variants = {(memory, fast): step_functions(speed_config(method, args.backbone, memory, fast, args.overrides), method,
                                                   args.batch, args.size, device)
                    for fast in (True, False) for memory in (False, True)}
        rates: dict[tuple[bool, bool], list[tuple[float, float]]] = {key: [] for key in variants}
        for _ in range(args.rounds):
            for key, (train_step, map_step) in variants.items():
                rates[key].append((images_per_second(train_step, args.steps, args.batch, device, clock),
                                   images_per_second(map_step, args.steps, args.batch, device, clock)))
        for fast in (True, False):
            for memory in (False, True):
                own, off, plain = rates[(memory, fast)], rates[(False, fast)], rates[(memory, False)]
                cost = statistics.median(o[0] / m[0] for o, m in zip(off, own))
                train_up = statistics.median(m[0] / p[0] for m, p in zip(own, plain))
                maps_up = statistics.median(m[1] / p[1] for m, p in zip(own, plain))
                label = f"{method_name(method, memory)}, {'speed path' if fast else 'before'}"
                print(f"{label:<32}{statistics.median(r[0] for r in own):>12.1f}{cost:>13.2f}{train_up:>10.2f}"
                      f"{statistics.median(r[1] for r in own):>12.1f}{maps_up:>10.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
