"""The command-line options both studies take, and how a study ends (one-line errors, exit 2)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.study.cells import DEFAULT_SHARED, DatasetSpec, custom_dataset, named_datasets, parse_names
from utils.errors import UserError, run_command


def add_common_options(parser: Any, default_datasets: str) -> None:
    """The options both studies take: seeds, students, datasets (named or one's own), epochs, out."""
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default 0,1,2)")
    parser.add_argument("--students", default="st,rd", help="comma-separated students: st, rd (default both)")
    parser.add_argument("--datasets", default=None,
                        help=f"comma-separated: demo, magnetic_tile (from --shared); default {default_datasets}")
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED,
                        help="folder holding data/magnetic_tile and weights/mobilenet_v2_imagenet1k.pth "
                             f"(default: the development machines' {DEFAULT_SHARED})")
    parser.add_argument("--data-root", default=None, help="your own dataset root instead of --datasets")
    parser.add_argument("--dataset-layout", default="mvtec", help="data.dataset of --data-root (default mvtec)")
    parser.add_argument("--category", default="all", help="data.category of --data-root (default all)")
    parser.add_argument("--epochs", type=int, default=None, help="train.epochs of every run (default: recipe)")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/memory"),
                        help="folder of the runs and tables; the same --out resumes (default results/benchmarks/memory)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained at once, each with its output in its folder's train.log and an equal "
                             "share of the CPU threads (default 1: one after another, output on the terminal)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("overrides", nargs="*", help="script arguments for every run: override.yaml, section.key=value")


def datasets_from(options: Any, default_datasets: str) -> list[DatasetSpec]:
    """The datasets named by ``--datasets``, or the one given by ``--data-root`` (not both); UserError
    when ``--out`` lies inside one of them (its tables and pictures would become training images)."""
    if options.data_root is not None:
        if options.datasets is not None:
            raise UserError("give --datasets or --data-root, not both")
        specs = [custom_dataset(options.data_root, options.dataset_layout, options.category)]
    else:
        names = parse_names(options.datasets if options.datasets is not None else default_datasets)
        if not names:
            raise UserError("--datasets is empty; name demo and/or magnetic_tile")
        specs = named_datasets(names, options.shared)
    out = getattr(options, "out", None)
    if out is not None:
        out = Path(out).expanduser().resolve()
        for spec in specs:
            if spec.root is not None and (out == spec.root or spec.root in out.parents):
                raise UserError(f"--out {out} lies inside the data root {spec.root}: the study's tables and pictures "
                                "would be read as images by the next run; give an --out outside it")
    return specs


def run_main(body: Any, options: Any) -> int:
    """Run ``body(options)`` the way the training scripts run: a UserError is one line and exit code 2."""
    def work(args: list[str]) -> None:
        body(options)

    return run_command(["--debug"] if options.debug else [], "", work,
                       "interrupted: rerun the same command to continue; finished runs are kept")
