"""Training and evaluation throughput on a CUDA GPU, and what a full MVTec AD study costs there.

    python benchmarks/gpu_speed.py [--backbones resnet18,wide_resnet50_2] [--methods st,rd] [--size 256]
                                   [--batch 16] [--eval-batch 32] [--steps 20] [--compile cudagraphs] [--budget-minutes 10]
                                   [--device cuda] [key=value ...]

One prepared command for a machine with a GPU, printed with the GPU's name. For each backbone, the
four methods (STPM, MemKD-ST, RD4AD, MemKD-RD), float32 and bfloat16 autocast, ``train.compile``
off and ``--compile`` (``cudagraphs`` by default: ready in seconds; ``step`` generates kernels and
takes minutes per shape), at ``--batch`` (16) and at each recipe's batch (STPM's 32; RD4AD's is 16): training
img/s over ``--steps`` steps of the engine's code (teacher features from the cache, the loss,
backward, optimiser step, the loss read back) after warm-up steps that also trace the compiled
step and let cuDNN pick its kernels; and evaluation img/s (anomaly maps in batches of
``--eval-batch``, copied to the CPU), which training's compile setting does not touch, so it is
timed once per method and precision. Rows stop when ``--budget-minutes`` is spent, saying which
were left out. Teachers are random: speed does not depend on weights.

Then the study's GPU time from the measured rates: one seed of 15 categories x 4 methods, each
method with its recipe's backbone, batch and epochs, on MVTec AD's 3629 training images (less the
validation slice, scored every epoch) and 1725 test images, in float32 without and with compile.

``--device cpu`` runs the same code on the CPU as a quick check of the script (float32, compile
off; the engine's bfloat16 autocast and CUDA graphs are for CUDA), with tiny sizes advised:
``--device cpu --backbones resnet18 --size 64 --batch 2 --eval-batch 2 --steps 1``.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.train_speed import images_per_second, speed_config, step_functions, synchronize  # noqa: E402
from engine.config import load_config  # noqa: E402
from models.registry import method_name  # noqa: E402
from utils.device import select_device  # noqa: E402

MVTEC_TRAIN_IMAGES, MVTEC_TEST_IMAGES, MVTEC_CATEGORIES = 3629, 1725, 15


@dataclass(frozen=True)
class Row:
    backbone: str
    method: str
    memory: bool
    amp: bool
    compile: str
    batch: int
    train: float  # img/s
    evaluate: float  # img/s


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, "
                f"cuDNN {torch.backends.cudnn.version()}")
    return f"CPU, {torch.get_num_threads()} threads"


def recipe(method: str) -> tuple[str, int, int, float]:
    """(backbone, batch size, epochs, validation fraction) of a script's recipe in config.yaml."""
    config = load_config(method, [])
    return config.model.backbone, config.train.batch_size, config.train.epochs, config.data.val_fraction


def study_minutes(rows: list[Row], compile_mode: str, methods: list[str]) -> tuple[float, list[str]] | None:
    """GPU minutes of one seed of the MVTec AD study in float32 with ``compile_mode``, from the
    rows measured at each recipe's backbone and batch; None when a needed row was not measured."""
    total, parts = 0.0, []
    for method in methods:
        backbone, batch, epochs, val_fraction = recipe(method)
        for memory in (False, True):
            found = [r for r in rows if (r.backbone, r.method, r.memory, r.amp, r.compile, r.batch)
                     == (backbone, method, memory, False, compile_mode, batch)]
            if not found:
                return None
            row = found[0]
            train_images = MVTEC_TRAIN_IMAGES * (1 - val_fraction)
            seconds = (epochs * train_images / row.train
                       + epochs * MVTEC_TRAIN_IMAGES * val_fraction / row.evaluate  # validation every epoch
                       + MVTEC_TEST_IMAGES / row.evaluate)
            total += seconds / 60
            parts.append(f"{method_name(method, memory)} {seconds / 60:.1f}")
    return total, parts


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="resnet18,wide_resnet50_2")
    parser.add_argument("--methods", default="st,rd")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16, help="the common batch, timed beside each recipe's")
    parser.add_argument("--eval-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compile", default="cudagraphs", choices=("step", "cudagraphs"),
                        help="the train.compile value of the compiled rows")
    parser.add_argument("--budget-minutes", type=float, default=10.0)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("overrides", nargs="*", help="key=value for every row, e.g. train.channels_last=true")
    args = parser.parse_args(argv)
    device = select_device(args.device)
    started = time.perf_counter()
    methods = [m for m in args.methods.split(",") if m]
    print(f"{describe_device(device)}; torch {torch.__version__}; {args.size} px, eval batch {args.eval_batch}, "
          f"{args.steps} timed steps; teacher-feature cache float32, overrides: {' '.join(args.overrides) or 'none'}")
    precisions = (False, True) if device.type == "cuda" else (False,)
    compile_modes = ("off", args.compile) if device.type == "cuda" else ("off",)
    print(f"{'backbone':<17}{'method':<10}{'precision':<10}{'compile':<12}{'batch':>6}{'train img/s':>12}"
          f"{'eval img/s':>12}{'ready s':>9}")
    rows: list[Row] = []
    left_out = 0
    for backbone in (b for b in args.backbones.split(",") if b):
        for method in methods:
            batches = sorted({args.batch, recipe(method)[1]})
            for memory in (False, True):
                for amp in precisions:
                    evaluate = None
                    for compile_mode in compile_modes:
                        for batch in batches:
                            if time.perf_counter() - started > 60 * args.budget_minutes:
                                left_out += 1
                                continue
                            config = speed_config(method, backbone, memory, fast=True,
                                                  extra=[f"train.amp={str(amp).lower()}",
                                                         f"train.compile={compile_mode}", *args.overrides])
                            if device.type == "cuda":
                                torch.cuda.empty_cache()
                            ready = time.perf_counter()
                            train_step, map_step = step_functions(config, method, batch, args.size, device)
                            train_step()  # traces the compiled step; cuDNN picks its kernels
                            synchronize(device)
                            ready = time.perf_counter() - ready
                            train = images_per_second(train_step, args.steps, batch, device)
                            if evaluate is None:
                                _, map_step = step_functions(config, method, args.eval_batch, args.size, device)
                                evaluate = images_per_second(map_step, args.steps, args.eval_batch, device)
                            row = Row(backbone, method, memory, amp, compile_mode, batch, train, evaluate)
                            rows.append(row)
                            print(f"{backbone:<17}{method_name(method, memory):<10}{'bf16' if amp else 'fp32':<10}"
                                  f"{compile_mode:<12}{batch:>6}{train:>12.1f}{evaluate:>12.1f}{ready:>9.1f}",
                                  flush=True)
    if left_out:
        print(f"{left_out} rows left out: --budget-minutes {args.budget_minutes:g} was spent; rerun with fewer "
              "--backbones or --methods for them")
    print(f"\nOne seed of the MVTec AD study ({MVTEC_CATEGORIES} categories, {MVTEC_TRAIN_IMAGES} training and "
          f"{MVTEC_TEST_IMAGES} test images; each method with its recipe's backbone, batch and epochs), float32:")
    for compile_mode in compile_modes:
        found = study_minutes(rows, compile_mode, methods)
        if found is None:
            print(f"  compile {compile_mode}: a recipe's row (its backbone at its batch) was not measured")
            continue
        total, parts = found
        print(f"  compile {compile_mode}: {total:.0f} GPU-minutes ({', '.join(parts)} minutes); three seeds "
              f"{3 * total:.0f} GPU-minutes, {'within' if 3 * total <= 60 else 'over'} one GPU-hour")
    print(f"(this run: {(time.perf_counter() - started) / 60:.1f} minutes)")


if __name__ == "__main__":
    main(sys.argv[1:])
