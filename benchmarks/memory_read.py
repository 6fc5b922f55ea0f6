"""The memory read two ways, timed side by side: scaled_dot_product_attention vs two matrix products.

    python benchmarks/memory_read.py [--backbones resnet18,wide_resnet50_2] [--size 256] [--batch 16]
                                     [--slots 50] [--repeats 7] [--threads 0] [--device cpu]

Both compute softmax(q r^T / T) v for the unit queries of every position of a batch (forward and
backward, as in a training step) on the feature shapes each student's memories read by default
(STPM after stages 1 and 2; RD4AD before the decoder stages that rebuild teacher stages 3 and 2).
Prints the median of ``--repeats`` timings of each and their ratio; the two alternate within every
repeat, since these machines are noisy. models/memory.py reads by attention on CUDA (one fused
operator each way) and by products on the CPU, the faster there by this script's figures.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from models.feature_extractor import FeatureExtractor  # noqa: E402
from models.memory import read_by_attention, read_by_products  # noqa: E402
from utils.device import select_device  # noqa: E402

TEMPERATURE = 0.05
READS = {"attention": read_by_attention, "products": read_by_products}


def memory_shapes(backbone: str, size: int) -> list[tuple[str, int, int]]:
    """(where, channels, positions per image) of the default memories of both students."""
    channels = FeatureExtractor(backbone).channels
    side = {1: size // 4, 2: size // 8, 3: size // 16}
    st = [(f"ST stage {s}", channels[s - 1], side[s] ** 2) for s in (1, 2)]
    rd = [(f"RD stage {s}", channels[s - 1], side[s] ** 2) for s in (3, 2)]
    return st + rd


def time_read(read, queries, rows, values, gradient, device) -> float:
    for leaf in (queries, rows, values):
        leaf.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    read(queries, rows, values, TEMPERATURE).backward(gradient)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="resnet18,wide_resnet50_2")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--slots", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    print(f"memory read, forward + backward, batch {args.batch}, {args.size} px, L={args.slots}, device {device}, "
          f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}; median of {args.repeats}")
    print(f"{'backbone':<18}{'memory':<12}{'C':>6}{'queries':>9}{'attention ms':>14}{'products ms':>13}{'ratio':>7}")
    generator = torch.Generator().manual_seed(0)
    for backbone in (b for b in args.backbones.split(",") if b):
        for where, channels, per_image in memory_shapes(backbone, args.size):
            count = args.batch * per_image
            queries = F.normalize(torch.randn(count, channels, generator=generator), dim=1).to(device).requires_grad_()
            rows = F.normalize(torch.randn(args.slots, channels, generator=generator), dim=1).to(device).requires_grad_()
            values = torch.randn(args.slots, channels, generator=generator).to(device).requires_grad_()
            gradient = torch.randn(count, channels, generator=generator).to(device)
            times = {name: [] for name in READS}
            for _ in range(args.repeats + 1):  # the first round warms up
                for name, read in READS.items():
                    times[name].append(time_read(read, queries, rows, values, gradient, device))
            attention, products = (1000 * statistics.median(times[name][1:]) for name in READS)
            print(f"{backbone:<18}{where:<12}{channels:>6}{count:>9}{attention:>14.1f}{products:>13.1f}"
                  f"{attention / products:>7.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
