"""Training and evaluation throughput on a CUDA GPU: ST and RD, memory off and on, float32 and
bfloat16 autocast, printed with the GPU's name. One prepared run for a machine with a GPU.

    python benchmarks/gpu_speed.py [--backbones resnet18,wide_resnet50_2] [--size 256] [--batch 16]
                                   [--eval-batch 32] [--steps 20] [--compile] [--device cuda]

Each row times ``--steps`` training steps of the engine's code path (teacher features from the
cache, ``model.loss``, backward, step, the loss read back) and ``--steps`` evaluation batches
(anomaly maps on the device, copied to the CPU), after warm-up steps that also let cuDNN pick its
kernels. Trailing ``key=value`` arguments go to every row (``train.channels_last=true`` for
cuDNN's channels-last kernels). ``--compile`` adds rows with the student under ``torch.compile``
(the compilation happens during warm-up and is reported separately). Teachers are random: speed
does not depend on weights. ``--device cpu`` runs the same code on the CPU as a quick check of the
script (float32 only: the engine's bfloat16 autocast is for CUDA), with tiny defaults advised:
``--device cpu --backbones resnet18 --size 64 --batch 4 --eval-batch 4 --steps 1``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.train_speed import images_per_second, speed_config, step_functions, synchronize  # noqa: E402
from models.registry import method_name  # noqa: E402
from utils.device import select_device  # noqa: E402
from engine.feature_cache import feature_bytes_per_image  # noqa: E402
from models.feature_extractor import FeatureExtractor  # noqa: E402

def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, "
                f"cuDNN {torch.backends.cudnn.version()}")
    return f"CPU, {torch.get_num_threads()} threads"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="resnet18,wide_resnet50_2")
    parser.add_argument("--methods", default="st,rd")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eval-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="also time the student under torch.compile")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("overrides", nargs="*", help="key=value for every row, e.g. train.channels_last=true")
    args = parser.parse_args(argv)
    device = select_device(args.device)
    print(f"{describe_device(device)}; torch {torch.__version__}; {args.size} px, train batch {args.batch}, "
          f"eval batch {args.eval_batch}, {args.steps} timed steps; teacher-feature cache float32, "
          f"overrides: {' '.join(args.overrides) or 'none'}")
    precisions = (False, True) if device.type == "cuda" else (False,)
    compiled = (False, True) if args.compile else (False,)
    print(f"{'backbone':<17}{'variant':<22}{'precision':<10}{'compile':<13}{'train img/s':>12}{'eval img/s':>12}"
          f"{'peak GiB':>10}{'cache MB/img':>14}")
    for backbone in (b for b in args.backbones.split(",") if b):
        per_image = feature_bytes_per_image(FeatureExtractor(backbone).channels, args.size, torch.float32) / 2**20
        for method in (m for m in args.methods.split(",") if m):
            for memory in (False, True):
                for amp in precisions:
                    for compile_student in compiled:
                        config = speed_config(method, backbone, memory, fast=True,
                                              extra=[f"train.amp={str(amp).lower()}", *args.overrides])
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                            torch.cuda.reset_peak_memory_stats(device)
                        started = time.perf_counter()
                        train_step, _ = step_functions(config, method, args.batch, args.size, device, compile_student)
                        _, map_step = step_functions(config, method, args.eval_batch, args.size, device,
                                                     compile_student)
                        train_step(), map_step()  # compiles, when asked; autotunes cuDNN
                        synchronize(device)
                        setup = time.perf_counter() - started
                        train = images_per_second(train_step, args.steps, args.batch, device)
                        evaluate = images_per_second(map_step, args.steps, args.eval_batch, device)
                        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
                        flag = f"yes ({setup:.0f} s)" if compile_student else "no"
                        print(f"{backbone:<17}{method_name(method, memory):<22}{'bf16' if amp else 'fp32':<10}"
                              f"{flag:<13}{train:>12.1f}{evaluate:>12.1f}{peak:>10.2f}{per_image:>14.2f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
