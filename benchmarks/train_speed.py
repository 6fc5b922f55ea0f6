"""Training and inference throughput, memory off vs on (and bf16 autocast on CUDA), side by side.

    python benchmarks/train_speed.py [--backbone resnet18] [--size 256] [--batch 16] [--steps 10] [--device auto]

For ST and RD, times ``--steps`` optimiser steps of the engine's own code path (``model.loss``,
backward, step) and ``anomaly_map`` batches on random images, after two warm-up steps, and prints
images per second with the ratio to the memory-off baseline measured in the same run (these
machines are noisy: compare ratios, not seconds across runs). On CUDA it adds bf16 autocast rows
and the peak GPU memory. The teacher is random: speed does not depend on weights.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from models import build_model, method_name  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.device import select_device  # noqa: E402
from utils.training import build_optimizer  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(method: str, memory: bool, amp: bool, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Images/s for training steps and for anomaly maps, and peak CUDA memory in GiB (0 on CPU)."""
    config = load_config(method, [f"model.backbone={args.backbone}", "model.pretrained=false",
                                  f"memory.enabled={str(memory).lower()}"])
    model = build_model(method, config).to(device)
    optimizer = build_optimizer(model.trainable_parameters(), config)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    model.set_exemplars(images[: min(config["memory.exemplars"], args.batch)])
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def train_step() -> None:
        with autocast:
            loss = model.loss(images)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def map_step() -> None:
        with autocast:
            model.anomaly_map(images)

    rates = {}
    for name, step, mode in (("train", train_step, True), ("maps", map_step, False)):
        model.train(mode)
        for _ in range(2):
            step()
        _sync(device)
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        _sync(device)
        rates[name] = args.steps * args.batch / (time.perf_counter() - started)
    rates["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return rates


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    device = select_device(args.device)
    torch.manual_seed(0)
    print(f"{args.backbone}, {args.size} px, batch {args.batch}, {args.steps} timed steps, device {device}, "
          f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    print(f"{'variant':<22}{'train img/s':>12}{'ratio':>8}{'maps img/s':>12}{'ratio':>8}{'peak GiB':>10}")
    for method in ("st", "rd"):
        baseline = None
        for memory, amp in ((False, False), (True, False)) + (((False, True), (True, True)) if device.type == "cuda" else ()):
            rates = measure(method, memory, amp, args, device)
            baseline = baseline or rates
            label = method_name(method, memory) + (" bf16" if amp else "")
            print(f"{label:<22}{rates['train']:>12.1f}{rates['train'] / baseline['train']:>8.2f}"
                  f"{rates['maps']:>12.1f}{rates['maps'] / baseline['maps']:>8.2f}{rates['peak_gib']:>10.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
