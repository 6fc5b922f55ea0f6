"""What the NR memory adds: ST and RD, memory off and on, on one dataset, side by side.

    python benchmarks/memory_ablation.py configs/demo.yaml
    python benchmarks/memory_ablation.py data.root=../shared/data/magnetic_tile data.category=magnetic_tile \
        model.backbone=mobilenet_v2 model.teacher_weights=../shared/weights/mobilenet_v2_imagenet1k.pth \
        data.image_size=128 train.epochs=10

Takes the scripts' arguments (override files, key=value), applied to both recipes; results go to
results/benchmarks unless output.dir is given. ``--methods rd`` runs only one student. Prints image / pixel AUROC per category for STPM,
MemKD-ST, RD4AD and MemKD-RD, the memory runs' recall entropy, and training time.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import method_name  # noqa: E402
from utils.cli import run_categories  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.report import mean_row, write_summary  # noqa: E402

VARIANTS = (("st", False), ("st", True), ("rd", False), ("rd", True))


def _pct(value) -> str:
    return "  -  " if value is None or value != value else f"{100 * value:5.1f}"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="st,rd", help="comma-separated students to compare: st, rd")
    options, script_args = parser.parse_known_args(argv)
    methods = options.methods.split(",")
    args = ["output.dir=results/benchmarks", *script_args]
    runs = {}
    for method, memory in [(m, memory) for m, memory in VARIANTS if m in methods]:
        config = load_config(method, [*args, f"memory.enabled={str(memory).lower()}"])
        runs[method_name(method, memory)] = run_categories(method, config)
    names = list(runs)
    categories = [r["category"] for r in runs[names[0]]]
    cell = 13
    print(f"\nimage / pixel AUROC (%), {config['data.dataset']}, {config['model.backbone']}, "
          f"{config['data.image_size']} px, {config['train.epochs']} epochs, teacher: {runs[names[0]][0]['teacher_weights']}")
    print(f"{'category':<16}" + "".join(f"{n:>{cell}}" for n in names))
    rows = {n: runs[n] + ([mean_row(runs[n])] if len(categories) > 1 else []) for n in names}
    for i, category in enumerate(categories + (["mean"] if len(categories) > 1 else [])):
        cells = [f"{_pct(rows[n][i]['image_auroc'])}/{_pct(rows[n][i]['pixel_auroc'])}" for n in names]
        print(f"{category:<16}" + "".join(f"{c:>{cell}}" for c in cells))
    print("\nrecall entropy (normalised, last epoch; 1 = uniform): student queries / exemplar queries")
    for n in names:
        if runs[n][0].get("recall_entropy") is not None:
            student = sum(r["recall_entropy"] for r in runs[n]) / len(runs[n])
            exemplar = sum(r["exemplar_entropy"] for r in runs[n]) / len(runs[n])
            print(f"  {n:<10} {student:.3f} / {exemplar:.3f}")
    print("\ntraining seconds (all categories): " + ", ".join(
        f"{n} {sum(r['train_seconds'] or 0 for r in runs[n]):.0f}" for n in names))
    report, _ = write_summary(config["output.dir"])
    print(f"all metrics: {report} (and summary.csv)")


if __name__ == "__main__":
    main(sys.argv[1:])
