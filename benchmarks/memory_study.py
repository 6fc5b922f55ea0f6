"""Which memory settings matter? One setting at a time around the defaults, paired with the default by seed.

    python benchmarks/memory_study.py --datasets magnetic_tile --seeds 0,1,2 --students st,rd --epochs 8
    python benchmarks/memory_study.py --settings memory.temperature,loss.lambda2 --seeds 0,1,2 --epochs 8
    python benchmarks/memory_study.py --datasets magnetic_tile --jobs 8 train.device=cuda data.image_size=256  # paper scale, 8 runs at once

For each dataset x student x seed it trains MemKD with the default config and, for each setting in
``--settings``, once per neighbouring value (the others left at their defaults), each a normal run
of trainRM_ST.py / trainRM_RD.py under ``--out``/runs; then it prints, per dataset and student,
each variant's mean +- std over seeds of image AUROC, pixel AUROC and AUPRO and its paired
difference from the default (same seed) with the 95% t-interval, and writes study.md,
study.csv and study.png into ``--out``. ``memory.enabled`` (memory off) is one of the settings,
so the table shows next to each setting's effect the effect of the memory as a whole. Trailing
``section.key=value`` arguments (or override files) go to every run and may move the default
(a variant equal to the default is left out). Finished runs are reused, so a killed study
continues when the same command is run again; with the same ``--out`` the default and memory-off
runs are those of benchmarks/memory_ablation.py. The last line gives the wall time.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.study.cells import DEFAULT, MEMORY_OFF, Cell, DatasetSpec, Variant, common_arguments, parse_names, parse_seeds, parse_students
from benchmarks.study.cli import add_common_options, datasets_from, run_main
from benchmarks.study.launcher import run_cells
from benchmarks.study.statistics import compare
from benchmarks.study.tables import finish
from utils.errors import UserError  # noqa: E402

DEFAULT_DATASETS = "demo"
RESERVED = {"train.seed": "--seeds", "output.dir": "--out", "memory.enabled": "the study (default: memory on)"}
# Config key -> the values tried around the default, per student. Neighbours on either side of
# the defaults (T 0.05, L 50, N 10, lambda1 1, lambda2 0.1), far enough apart to matter: a factor
# of 2-20. Which stages hold a memory differs by student: ST has them after student stages 1 and
# 2; RD after the decoder stages that rebuild teacher stages 3 and 2, and can also have one on
# the bottleneck's output (as the older unofficial code did).
SETTINGS: dict[str, dict[str, tuple[Any, ...]]] = {
    "memory.enabled": {"st": (False,), "rd": (False,)},
    "memory.temperature": {"st": (0.02, 0.1), "rd": (0.02, 0.1)},
    "memory.slots": {"st": (10, 200), "rd": (10, 200)},
    "memory.exemplars": {"st": (3, 30), "rd": (3, 30)},
    "loss.lambda1": {"st": (0.1, 10.0), "rd": (0.1, 10.0)},
    "loss.lambda2": {"st": (0.0, 1.0), "rd": (0.0, 1.0)},
    "memory.stages": {"st": ([1], [2]), "rd": ([3], [2], ["bottleneck", 3, 2])},
    "memory.fusion": {"st": ("add",), "rd": ("add",)},
}


def value_text(value: Any) -> str:
    """A setting's value as the scripts read it: false, 0.02, add, [bottleneck, 3, 2]."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    return str(value)


def variant_for(key: str, value: Any) -> Variant:
    """The variant that sets ``key`` to ``value``; memory.enabled=false is the ablation's "memory off"."""
    override = f"{key}={value_text(value)}"
    return MEMORY_OFF if override == MEMORY_OFF.overrides[0] else Variant(override, (override,))


def chosen_settings(text: str | None, schema: Any) -> tuple[list[str], list[str]]:
    """(settings to run, notes). ``text`` None means every setting the config knows; a setting asked
    for by name that is unknown, or not a config key yet, is a UserError."""
    if text is None:
        keys = [k for k in SETTINGS if k in schema]
        notes = [f"{k}: not a config key in this version (engine/config.py), left out" for k in SETTINGS if k not in schema]
        return keys, notes
    keys = parse_names(text)
    for key in keys:
        if key not in SETTINGS:
            raise UserError(f"unknown setting '{key}' in --settings; choose from {', '.join(SETTINGS)}")
        if key not in schema:
            raise UserError(f"--settings {key}: this version has no config key {key} (engine/config.py); "
                            "leave it out of --settings")
    if not keys:
        raise UserError(f"--settings is empty; choose from {', '.join(SETTINGS)}")
    return list(dict.fromkeys(keys)), []


def plan(datasets: list[DatasetSpec], students: list[str], keys: list[str], out: Path,
         common: list[str]) -> tuple[dict[tuple[str, str], list[Variant]], list[str]]:
    """The variants of each (dataset, student), in settings order, and notes on those left out.

    A value equal to the default (as resolved with the shared arguments) would compare the
    default with itself, so it is left out; every variant's config is resolved here, so a value
    the config refuses stops the study before any training.
    """
    from engine.config import load_config

    variants: dict[tuple[str, str], list[Variant]] = {}
    notes: list[str] = []
    for dataset in datasets:
        for student in students:
            default = load_config(student, Cell(dataset, student, DEFAULT, 0).arguments(out, common))
            chosen = []
            for key in keys:
                for value in SETTINGS[key][student]:
                    variant = variant_for(key, value)
                    config = load_config(student, Cell(dataset, student, variant, 0).arguments(out, common))
                    if config.flat()[key] == default.flat()[key]:
                        notes.append(f"{dataset.name} {student.upper()}: {variant.overrides[0]} is the default, left out")
                    else:
                        chosen.append(variant)
            variants[(dataset.name, student)] = chosen
    return variants, notes


def study(options: argparse.Namespace) -> list[dict]:
    """Train every missing cell, write study.{csv,md,png} into ``options.out``; return the rows."""
    from engine.config import SCHEMA

    started = time.perf_counter()
    seeds, students = parse_seeds(options.seeds), parse_students(options.students)
    datasets = datasets_from(options, DEFAULT_DATASETS)
    common = common_arguments(options.overrides, options.epochs, RESERVED)
    keys, notes = chosen_settings(options.settings, SCHEMA)
    variants, more_notes = plan(datasets, students, keys, options.out, common)
    for note in notes + more_notes:
        print(f"note: {note}")
    # Seeds outermost: an interrupted study already holds complete seeds of every variant.
    cells = [Cell(dataset, student, variant, seed) for seed in seeds for dataset in datasets for student in students
             for variant in (DEFAULT, *variants[(dataset.name, student)])]
    done = run_cells(cells, options.out, common, options.jobs)
    rows = [row for dataset in datasets for student in students for variant in variants[(dataset.name, student)]
            for row in compare(done, dataset, student, DEFAULT, variant, seeds)]
    title = "Memory settings, one at a time: variant - default, paired by seed"
    finish(rows, done, seeds, options.out, "study", title, started)
    return rows


def main(argv: list[str]) -> int:
    """Parse the options and run the study; 2 on a user error (one line), 130 when interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_options(parser, DEFAULT_DATASETS)
    parser.add_argument("--settings", default=None,
                        help=f"comma-separated settings to vary (default every one the config has): {', '.join(SETTINGS)}")
    return run_main(study, parser.parse_intermixed_args(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
