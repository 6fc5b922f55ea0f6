"""Does the NR memory help? ST and RD with memory off and on, over several seeds, with paired differences.

    python benchmarks/memory_ablation.py --datasets demo,magnetic_tile --seeds 0,1,2 --students st,rd --epochs 8
    python benchmarks/memory_ablation.py --data-root /data/mvtec_ad --dataset-layout mvtec --category bottle \\
        train.device=cuda data.image_size=256

For each dataset x student x seed it trains the baseline (memory.enabled=false: STPM or RD4AD) and
MemKD with the same seed (same split, exemplars and initialisation), each a normal run of
trainRM_ST.py / trainRM_RD.py under ``--out``/runs. Then it prints, per dataset and student, the
mean +- standard deviation over seeds of image AUROC, pixel AUROC and AUPRO (the mean over
categories for ``data.category=all``) for memory off and on, and the paired difference on - off
with its 95% t-interval; it writes the same as ablation.md and ablation.csv, and the differences
as ablation.png, into ``--out``. Trailing ``section.key=value`` arguments (or override files) go
to every run. Runs already finished with the same config are reused: a killed ablation
continues when the same command is run again, and --seeds 0,1,2,3,4 later trains only seeds 3
and 4. Datasets: demo (built in, random teacher without internet) and magnetic_tile
(../shared/data/magnetic_tile with the ImageNet MobileNetV2 teacher, 128 px).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.study.cells import MEMORY_OFF, Cell, Variant, common_arguments, parse_seeds, parse_students
from benchmarks.study.cli import add_common_options, datasets_from, run_main
from benchmarks.study.launcher import run_cells
from benchmarks.study.statistics import compare
from benchmarks.study.tables import finish

DEFAULT_DATASETS = "demo"
MEMORY_ON = Variant("memory on")  # the default config (memory.enabled=true): the study's "default" runs
RESERVED = {"train.seed": "--seeds", "output.dir": "--out", "memory.enabled": "this ablation (off and on)"}


def ablation(options: argparse.Namespace) -> list[dict]:
    """Train every missing cell, write ablation.{csv,md,png} into ``options.out``; return the rows."""
    started = time.perf_counter()
    seeds, students = parse_seeds(options.seeds), parse_students(options.students)
    datasets = datasets_from(options, DEFAULT_DATASETS)
    common = common_arguments(options.overrides, options.epochs, RESERVED)
    # Seeds outermost: an interrupted ablation already holds complete seeds, each with both sides.
    cells = [Cell(dataset, student, variant, seed) for seed in seeds for dataset in datasets
             for student in students for variant in (MEMORY_OFF, MEMORY_ON)]
    done = run_cells(cells, options.out, common, options.jobs)
    rows = [row for dataset in datasets for student in students
            for row in compare(done, dataset, student, MEMORY_OFF, MEMORY_ON, seeds)]
    title = "Memory ablation: memory on - off, paired by seed"
    finish(rows, done, seeds, options.out, "ablation", title, started)
    return rows


def main(argv: list[str]) -> int:
    """Parse the options and run the ablation; 2 on a user error (one line), 130 when interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_options(parser, DEFAULT_DATASETS)
    return run_main(ablation, parser.parse_intermixed_args(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
