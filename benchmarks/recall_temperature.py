"""How selective is the memory read? Recall entropy and AUROC of MemKD across temperatures.

    python benchmarks/recall_temperature.py --temperatures 1,0.1,0.05,0.02 [script arguments ...]

Cosine similarity lies in [-1, 1], so softmax(cos / T) over L=50 slots is nearly uniform at T=1:
every query then reads the same mix of values. This trains MemKD-ST (``--method rd`` for RD) once
per temperature with the given arguments and prints the normalised entropy of the read weights
(1 = uniform, 0 = a single slot) for student and exemplar queries beside image / pixel AUROC.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.cli import run_categories  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.report import mean_row  # noqa: E402


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--temperatures", default="1,0.1,0.05,0.02")
    parser.add_argument("--method", choices=("st", "rd"), default="st")
    options, script_args = parser.parse_known_args(argv)
    rows = []
    for temperature in [float(t) for t in options.temperatures.split(",")]:
        # One output folder per temperature, so the runs do not resume or skip each other.
        config = load_config(options.method, [*script_args, f"memory.temperature={temperature}",
                                              f"output.dir=results/benchmarks/temperature/T{temperature}"])
        results = run_categories(config)
        mean = mean_row(results)
        rows.append((temperature, sum(r["recall_entropy"] for r in results) / len(results),
                     sum(r["exemplar_entropy"] for r in results) / len(results), mean["image_auroc"],
                     mean["pixel_auroc"], results[0]["teacher_weights"]))
    print(f"\nMemKD-{options.method.upper()}, {config.data.dataset}/{config.data.category}, "
          f"{config.model.backbone}, {config.data.image_size} px, {config.train.epochs} epochs, "
          f"L={config.memory.slots}; teacher: {rows[0][5]}")
    print(f"{'temperature':>11}  {'student H':>9}  {'exemplar H':>10}  {'I-AUROC':>7}  {'P-AUROC':>7}")
    for temperature, student, exemplar, image, pixel, _ in rows:
        print(f"{temperature:>11g}  {student:>9.3f}  {exemplar:>10.3f}  {100 * image:>7.1f}  {100 * pixel:>7.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
