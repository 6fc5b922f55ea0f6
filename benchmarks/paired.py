"""What memory_ablation.py and memory_study.py share: the datasets, one training run per cell,
the paired statistics over seeds, and the CSV / Markdown / PNG outputs.

A *cell* is one normal training run (dataset x student x variant x seed), launched as a
subprocess of trainRM_ST.py / trainRM_RD.py with its own ``output.dir``:

    {out}/runs/{dataset}/{student}/{variant folder}/seed{seed}/

The variant folder is named by the variant's overrides ("default" when there are none), so the
ablation's memory-on runs are the study's default runs when both use the same ``--out``, and a
run is never trained twice. A cell whose results.json already matches its config (the engine's
own test, :func:`engine.run.finished_results`, without re-reading the images: replacing a
dataset's files under a finished study needs a new ``--out``) is reused without starting a
process, so a killed study continues where it stopped when the same command is run again.

A *paired difference* compares two variants trained with the same seed (same train/validation
split, exemplar set and initialisation): d_s = variant_s - reference_s, reported as the mean of
d over seeds with a two-sided t-interval, mean +- t_{(1+c)/2, n-1} * sd(d) / sqrt(n).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from utils.errors import UserError, run_command

if TYPE_CHECKING:
    from engine.config import RunSettings

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"  # the project's shared data, present on the development machines
SCRIPTS = {"st": REPO / "trainRM_ST.py", "rd": REPO / "trainRM_RD.py"}
STUDENTS = tuple(SCRIPTS)
# (results.json key, column header); values are fractions, tables print percent.
METRICS: tuple[tuple[str, str], ...] = (("image_auroc", "I-AUROC"), ("pixel_auroc", "P-AUROC"),
                                        ("pixel_aupro", "AUPRO"))
CONFIDENCE = 0.95
TABLE_NOTE = ("Metrics in percent: mean ± sample standard deviation over seeds; each difference row gives the mean "
              "paired difference (same seed) with its 95% t-interval, and the seeds it pairs.")
CSV_FIELDS = ("dataset", "student", "reference", "variant", "label", "metric", "n", "seeds", "reference_mean",
              "reference_std", "variant_mean", "variant_std", "difference", "low", "high")


# --------------------------------------------------------------------------- what to run


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset of the study: ``name`` labels tables and folders, ``args`` are script arguments."""

    name: str
    args: tuple[str, ...]


@dataclass(frozen=True)
class Variant:
    """A setting compared in a study: a display ``name`` and the overrides that make it."""

    name: str
    overrides: tuple[str, ...] = ()

    @property
    def folder(self) -> str:
        """The run folder: "default" without overrides, else the overrides made filesystem-safe."""
        return "_".join(_safe(o) for o in self.overrides) or "default"


DEFAULT = Variant("default")
MEMORY_OFF = Variant("memory off", ("memory.enabled=false",))


@dataclass(frozen=True)
class Cell:
    """One training run: a dataset, a student (st or rd), a variant and a seed."""

    dataset: DatasetSpec
    student: str
    variant: Variant
    seed: int

    def output_dir(self, out: Path) -> Path:
        """The run's ``output.dir``, unique to the cell (the engine adds {method}/{dataset}/{category})."""
        return Path(out) / "runs" / self.dataset.name / self.student / self.variant.folder / f"seed{self.seed}"

    def arguments(self, out: Path, common: Sequence[str]) -> list[str]:
        """Script arguments, later ones winning: dataset, shared ones, the variant, seed and output folder."""
        return [*self.dataset.args, *common, *self.variant.overrides, f"train.seed={self.seed}",
                f"output.dir={self.output_dir(out)}"]

    def describe(self) -> str:
        return f"{self.dataset.name} {self.student.upper()} {self.variant.name}, seed {self.seed}"


def _safe(text: str) -> str:
    """``text`` as a folder name: brackets and spaces dropped, other unusual characters as '-'."""
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", re.sub(r"[\[\]\s]", "", text)).strip("-") or "_"


def named_datasets(names: Sequence[str], shared: Path = SHARED) -> list[DatasetSpec]:
    """The datasets ``demo`` and ``magnetic_tile`` as script arguments.

    demo: configs/demo.yaml (resnet18, 128 px, every category), generated under the repository's
    data/demo. magnetic_tile: ``shared``/data/magnetic_tile in MVTec layout with the ImageNet
    MobileNetV2 teacher from ``shared``/weights, 128 px. Raises UserError for another name, or for
    magnetic_tile when ``shared`` lacks its files.
    """
    specs = []
    for name in names:
        if name == "demo":
            specs.append(DatasetSpec("demo", (str(REPO / "configs" / "demo.yaml"), f"data.root={REPO / 'data' / 'demo'}")))
        elif name == "magnetic_tile":
            data, weights = shared / "data" / "magnetic_tile", shared / "weights" / "mobilenet_v2_imagenet1k.pth"
            for needed in (data, weights):
                if not needed.exists():
                    raise UserError(f"--datasets magnetic_tile needs {needed}, which is absent (it comes with the "
                                    f"project's shared folder {shared}); use --datasets demo, or --data-root with "
                                    "--dataset-layout and --category for a copy of your own")
            specs.append(DatasetSpec("magnetic_tile", (
                "data.dataset=mvtec", f"data.root={data}", "data.category=magnetic_tile", "data.image_size=128",
                "data.num_workers=0", "model.backbone=mobilenet_v2", f"model.teacher_weights={weights}")))
        else:
            raise UserError(f"unknown dataset '{name}' in --datasets; use demo and/or magnetic_tile, or --data-root "
                            "with --dataset-layout and --category for another dataset")
    return specs


def custom_dataset(root: str | Path, layout: str, category: str) -> DatasetSpec:
    """A dataset of one's own: ``data.root``, ``data.dataset`` (layout) and ``data.category``.

    Named after the category, or after the root folder when the category is ``all``.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise UserError(f"--data-root {root} is not a folder; give the folder that holds the category folders")
    name = _safe(root.name if category == "all" else category)
    return DatasetSpec(name, (f"data.dataset={layout}", f"data.root={root}", f"data.category={category}"))


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; UserError for anything else, or a seed given twice."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers, e.g. --seeds 0,1,2, not {text!r}") from None
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise UserError(f"--seeds must be distinct non-negative integers, e.g. --seeds 0,1,2, not {text!r}")
    return seeds


def parse_students(text: str) -> list[str]:
    """'st,rd' -> ['st', 'rd']; UserError for another name."""
    students = [part.strip().lower() for part in text.split(",")]
    unknown = [s for s in students if s not in STUDENTS]
    if unknown or len(set(students)) != len(students):
        raise UserError(f"--students must name st and/or rd once each, e.g. --students st,rd, not {text!r}")
    return students


def parse_names(text: str) -> list[str]:
    """'demo,magnetic_tile' -> ['demo', 'magnetic_tile'] (empty parts dropped)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def common_arguments(extras: Sequence[str], epochs: int | None, reserved: Mapping[str, str]) -> list[str]:
    """The arguments every run gets: ``train.epochs`` from ``--epochs``, then the extra overrides.

    ``reserved`` maps keys the study sets itself to the option that sets them; such a key in
    ``extras`` (or ``train.epochs`` together with ``--epochs``) is a UserError naming the option.
    """
    taken = dict(reserved)
    if epochs is not None:
        if epochs < 1:
            raise UserError(f"--epochs must be at least 1, not {epochs}")
        taken["train.epochs"] = "--epochs"
    for arg in extras:
        key = arg.partition("=")[0].strip().removeprefix("--")
        if "=" in arg and key in taken:
            raise UserError(f"{key} is set by {taken[key]} for every run; drop '{arg}' from the overrides")
    return ([f"train.epochs={epochs}"] if epochs is not None else []) + list(extras)


# --------------------------------------------------------------------------- running


@dataclass
class CellResult:
    """A finished cell: its per-category results.json contents and their mean per metric."""

    results: list[dict[str, Any]]
    metrics: dict[str, float | None]
    trained: bool


def launch(student: str, args: Sequence[str], log: Path | None = None, threads: int | None = None) -> int:
    """Train one run as ``python trainRM_<student>.py args`` in a process of its own; its exit code.

    With ``log`` the run's output goes to that file (created with its folder) instead of the
    terminal; with ``threads`` the process gets ``OMP_NUM_THREADS=threads`` (torch's CPU thread
    count) unless the caller's environment already sets it.
    """
    env = dict(os.environ)
    if threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    command = [sys.executable, str(SCRIPTS[student]), *args]
    if log is None:
        return subprocess.run(command, check=False, env=env).returncode
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as stream:
        return subprocess.run(command, check=False, env=env, stdout=stream, stderr=subprocess.STDOUT).returncode


def _categories(config: RunSettings) -> list[str]:
    from datasets.build import list_categories

    if config.data.category == "all":
        return list_categories(config.data.dataset, config.data.root)
    return [config.data.category]


def _finished(config: RunSettings, categories: Sequence[str]) -> list[dict[str, Any]] | None:
    """Every category's results when all of them finished with exactly this config, else None."""
    from engine.records import finished_results, run_directory

    found = [finished_results(run_directory(config, c), config) for c in categories]
    return None if any(r is None for r in found) else found  # type: ignore[return-value]


def _conflict(config: RunSettings, categories: Sequence[str]) -> str | None:
    """Why a run folder of this cell cannot be continued with ``config``, or None when it can.

    A folder holding a run (finished, or interrupted with only last.pt) made with other training
    settings would make the engine refuse to resume, possibly hours into a study; this finds it first.
    """
    from engine.checkpoint import load_checkpoint
    from engine.config import config_differences
    from engine.records import run_directory

    for category in categories:
        run_dir = run_directory(config, category)
        saved = None
        if (run_dir / "results.json").is_file():
            try:
                saved = json.loads((run_dir / "results.json").read_text()).get("config")
            except (OSError, ValueError, AttributeError):
                saved = None
        if saved is None and (run_dir / "last.pt").is_file():
            saved = load_checkpoint(run_dir / "last.pt").get("config")
        differences = config_differences(saved, config) if isinstance(saved, dict) else []
        if differences:
            return f"{run_dir} holds a run made with other settings ({differences[0]})"
    return None


def category_mean(results: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """Each metric's mean over categories, ignoring categories where it is undefined (None or NaN)."""
    means: dict[str, float | None] = {}
    for key, _ in METRICS:
        values = [float(r[key]) for r in results if _finite(r.get(key))]
        means[key] = sum(values) / len(values) if values else None
    return means


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def run_cells(cells: Sequence[Cell], out: Path, common: Sequence[str], jobs: int = 1) -> dict[Cell, CellResult]:
    """Train every cell that has not finished with its config; return all cells' results.

    Every cell's config is resolved first, and every run folder checked, so a bad key or value,
    or a folder holding a run with other settings, stops the study before any training. With
    ``jobs`` 1 the runs go one after another, their output on the terminal; with more, up to
    ``jobs`` run at once (cells are independent runs), each writing its output to ``train.log``
    in its folder and getting an equal share of the CPU threads. A run that fails stops the
    study with a UserError once the runs already started have ended; every finished run is
    kept and reused on the next invocation.
    """
    from engine.config import load_config

    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, not {jobs}")
    plans = []
    for cell in cells:
        config = load_config(cell.student, cell.arguments(out, common))
        categories = _categories(config)
        finished = _finished(config, categories) if config.train.resume else None
        conflict = _conflict(config, categories) if finished is None and config.train.resume else None
        if conflict is not None:
            raise UserError(f"{conflict}; a study with other shared settings (--epochs, overrides) needs "
                            "another --out")
        plans.append((cell, config, categories, finished))
    pending = [(i, cell) for i, (cell, _, _, results) in enumerate(plans, start=1) if results is None]
    for i, (cell, _, _, results) in enumerate(plans, start=1):
        if results is not None:
            print(f"[{i}/{len(plans)}] {cell.describe()}: finished earlier, reused", flush=True)
    if jobs == 1:
        for i, cell in pending:
            print(f"[{i}/{len(plans)}] {cell.describe()}: training", flush=True)
            _check_exit(cell, launch(cell.student, cell.arguments(out, common)), None)
    else:
        _train_at_once(pending, len(plans), out, common, jobs)
    done: dict[Cell, CellResult] = {}
    for cell, config, categories, results in plans:
        trained = results is None
        if trained:
            results = _finished(config, categories)
            if results is None:
                raise UserError(f"the run {cell.describe()} ended without results.json in {cell.output_dir(out)}; "
                                "rerun the same command")
        done[cell] = CellResult(results, category_mean(results), trained)
    return done


def _check_exit(cell: Cell, code: int, log: Path | None) -> None:
    """A UserError naming the failed run (and where its output is) unless ``code`` is 0."""
    if code != 0:
        where = f"its output is in {log}" if log is not None else "its error is above"
        raise UserError(f"the run {cell.describe()} failed with exit code {code} ({where}); "
                        "fix the cause and rerun the same command: finished runs are kept")


def _train_at_once(pending: Sequence[tuple[int, Cell]], total: int, out: Path, common: Sequence[str],
                   jobs: int) -> None:
    """Train ``pending`` cells, up to ``jobs`` at a time; after a failure start no more, let the
    started ones end, then raise the first failure's UserError."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    queue = list(pending)
    running: dict[Future, tuple[int, Cell, Path]] = {}
    failure: tuple[Cell, int, Path] | None = None
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while queue or running:
            while queue and failure is None and len(running) < jobs:
                i, cell = queue.pop(0)
                log = cell.output_dir(out) / "train.log"
                print(f"[{i}/{total}] {cell.describe()}: training (output in {log})", flush=True)
                future = pool.submit(launch, cell.student, cell.arguments(out, common), log=log, threads=threads)
                running[future] = (i, cell, log)
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                i, cell, log = running.pop(future)
                code = future.result()
                print(f"[{i}/{total}] {cell.describe()}: {'done' if code == 0 else f'failed (exit code {code})'}",
                      flush=True)
                if code != 0 and failure is None:
                    failure = (cell, code, log)
    if failure is not None:
        _check_exit(*failure)


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class PairedDifference:
    """Mean paired difference over ``n`` seeds with its two-sided interval (NaN bounds when n < 2)."""

    n: int
    mean: float
    low: float
    high: float


def paired_difference(variant: Sequence[float], reference: Sequence[float],
                      confidence: float = CONFIDENCE) -> PairedDifference:
    """The mean of ``variant[i] - reference[i]`` (pairs from the same seed) with its t-interval.

    The interval is mean +- t.ppf((1 + confidence) / 2, n - 1) * sd / sqrt(n), sd the sample
    standard deviation (n - 1) of the differences: Student's t for a mean of n paired
    differences. With one pair the mean is returned with NaN bounds; with none, NaN throughout.
    """
    from scipy.stats import t

    if len(variant) != len(reference):
        raise ValueError(f"paired values must come in pairs: {len(variant)} vs {len(reference)}")
    differences = [float(v) - float(r) for v, r in zip(variant, reference)]
    n = len(differences)
    if n == 0:
        return PairedDifference(0, math.nan, math.nan, math.nan)
    mean = sum(differences) / n
    if n < 2:
        return PairedDifference(1, mean, math.nan, math.nan)
    half = float(t.ppf((1 + confidence) / 2, n - 1)) * statistics.stdev(differences) / math.sqrt(n)
    return PairedDifference(n, mean, mean - half, mean + half)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation); the deviation is NaN for fewer than two values."""
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    return mean, statistics.stdev(values) if len(values) > 1 else math.nan


def compare(done: Mapping[Cell, CellResult], dataset: DatasetSpec, student: str, reference: Variant,
            variant: Variant, seeds: Sequence[int]) -> list[dict[str, Any]]:
    """One row per metric comparing ``variant`` with ``reference`` (CSV_FIELDS; fractions).

    Means and deviations use every seed where the side has a value; the difference pairs only
    seeds where both have one (a metric can be undefined, e.g. AUPRO without masks).
    """
    rows = []
    for key, _ in METRICS:
        by_seed = {}
        for seed in seeds:
            ref = done.get(Cell(dataset, student, reference, seed))
            var = done.get(Cell(dataset, student, variant, seed))
            by_seed[seed] = (ref.metrics.get(key) if ref else None, var.metrics.get(key) if var else None)
        ref_values = [r for r, _ in by_seed.values() if _finite(r)]
        var_values = [v for _, v in by_seed.values() if _finite(v)]
        paired_seeds = [s for s, (r, v) in by_seed.items() if _finite(r) and _finite(v)]
        diff = paired_difference([by_seed[s][1] for s in paired_seeds], [by_seed[s][0] for s in paired_seeds])
        (ref_mean, ref_std), (var_mean, var_std) = mean_std(ref_values), mean_std(var_values)
        rows.append({
            "dataset": dataset.name, "student": student, "reference": reference.name, "variant": variant.name,
            "label": f"{dataset.name} {student.upper()}: {variant.name} - {reference.name}", "metric": key,
            "n": diff.n, "seeds": " ".join(str(s) for s in paired_seeds),
            "reference_mean": ref_mean, "reference_std": ref_std, "variant_mean": var_mean, "variant_std": var_std,
            "difference": diff.mean, "low": diff.low, "high": diff.high,
        })
    return rows


# --------------------------------------------------------------------------- outputs


def _pct(value: float, signed: bool = False) -> str:
    if not _finite(value):
        return "-"
    percent = round(100 * value, 1) + 0.0  # + 0.0 turns -0.0 into 0.0: no "-0.0" for a tiny negative
    return f"{percent:+.1f}" if signed else f"{percent:.1f}"


def _mean_std_cell(mean: float, std: float) -> str:
    if not _finite(mean):
        return "-"
    return f"{_pct(mean)} ± {_pct(std)}" if _finite(std) else _pct(mean)


def _difference_cell(row: Mapping[str, Any]) -> str:
    if not _finite(row["difference"]):
        return "-"
    interval = f" [{_pct(row['low'], True)}, {_pct(row['high'], True)}]" if _finite(row["low"]) else " (1 seed)"
    return _pct(row["difference"], True) + interval


def format_markdown(rows: Sequence[Mapping[str, Any]], context: Iterable[str] = ()) -> str:
    """Markdown tables in percent, one block per dataset and student: the reference's mean ± std,
    then each variant's mean ± std and its paired difference with the 95% interval and seeds."""
    lines = [f"- {line}" for line in context]
    lines += [""] if lines else []
    lines += ["| dataset | student | run | " + " | ".join(h for _, h in METRICS) + " | seeds |",
              "|---|---|---|" + "---:|" * len(METRICS) + "---|"]
    # (dataset, student) -> variant -> metric -> row, in the order the rows come.
    blocks: dict[tuple[str, str], dict[str, dict[str, Mapping[str, Any]]]] = {}
    for row in rows:
        blocks.setdefault((row["dataset"], row["student"]), {}).setdefault(row["variant"], {})[row["metric"]] = row

    def line(start: str, run: str, by_metric: Mapping[str, Mapping[str, Any]], cell: Any, seeds: str = "") -> str:
        values = [cell(by_metric[key]) if key in by_metric else "-" for key, _ in METRICS]
        return f"{start} {run} | " + " | ".join(values) + f" | {seeds} |"

    for (dataset, student), variants in blocks.items():
        start = f"| {dataset} | {student.upper()} |"
        first = next(iter(variants.values()))
        reference = next(iter(first.values()))["reference"]
        lines.append(line(start, reference, first, lambda r: _mean_std_cell(r["reference_mean"], r["reference_std"])))
        for variant, by_metric in variants.items():
            lines.append(line(start, variant, by_metric, lambda r: _mean_std_cell(r["variant_mean"], r["variant_std"])))
            lines.append(line(start, f"{variant} − {reference}, 95% CI", by_metric, _difference_cell,
                              next(iter(by_metric.values()))["seeds"]))
    return "\n".join(lines) + "\n"


def format_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as CSV (CSV_FIELDS), metrics as fractions in [0, 1], empty where undefined."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(row[k], float) and not math.isfinite(row[k]) else
                             f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]) for k in CSV_FIELDS})
    return buffer.getvalue()


def context_lines(done: Mapping[Cell, CellResult], seeds: Sequence[int]) -> list[str]:
    """One line per dataset and student saying how its runs were trained (from their results.json)."""
    lines: dict[tuple[str, str], str] = {}
    for cell, result in done.items():
        key = (cell.dataset.name, cell.student)
        if key in lines or not result.results:
            continue
        first = result.results[0]
        config = first.get("config") or {}
        categories = ", ".join(str(r["category"]) for r in result.results)
        lines[key] = (f"{cell.dataset.name} {cell.student.upper()} ({categories}): {first.get('backbone')}, "
                      f"{first.get('image_size')} px, {first.get('epochs')} epochs, batch {config.get('train.batch_size')}, "
                      f"device {first.get('device')}, seeds {' '.join(map(str, seeds))}; "
                      f"teacher: {first.get('teacher_weights')}")
    return list(lines.values())


def write_outputs(rows: Sequence[Mapping[str, Any]], out: Path, stem: str, title: str,
                  context: Sequence[str]) -> tuple[str, list[Path]]:
    """Write ``{stem}.csv``, ``{stem}.md`` and ``{stem}.png`` into ``out``; return (markdown, paths)."""
    from utils.io import write_text
    from engine.plots import save_paired_differences

    markdown = format_markdown(rows, context)
    out = Path(out)
    paths = [write_text(out / f"{stem}.csv", format_csv(rows)),
             write_text(out / f"{stem}.md", f"# {title}\n\n{TABLE_NOTE}\n\n{markdown}"),
             save_paired_differences(rows, out / f"{stem}.png", title=title)]
    return markdown, paths


def finish(rows: Sequence[Mapping[str, Any]], done: Mapping[Cell, CellResult], seeds: Sequence[int], out: Path,
           stem: str, title: str, started: float) -> None:
    """Write ``{stem}``.csv/.md/.png into ``out``, print the table, the files and the wall time since ``started``."""
    markdown, paths = write_outputs(rows, out, stem, title, context_lines(done, seeds))
    trained = sum(result.trained for result in done.values())
    print(f"\n{title} (metrics in %)\n\n{markdown}")
    print(f"written: {', '.join(str(p) for p in paths)}")
    print(f"wall time {time.perf_counter() - started:.0f} s ({trained} runs trained, "
          f"{len(done) - trained} finished earlier and reused)")


def add_common_options(parser: Any, default_datasets: str) -> None:
    """The options both studies take: seeds, students, datasets (named or one's own), epochs, out."""
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default 0,1,2)")
    parser.add_argument("--students", default="st,rd", help="comma-separated students: st, rd (default both)")
    parser.add_argument("--datasets", default=None,
                        help=f"comma-separated: demo, magnetic_tile (../shared); default {default_datasets}")
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
    """The datasets named by ``--datasets``, or the one given by ``--data-root`` (not both)."""
    if options.data_root is not None:
        if options.datasets is not None:
            raise UserError("give --datasets or --data-root, not both")
        return [custom_dataset(options.data_root, options.dataset_layout, options.category)]
    names = parse_names(options.datasets if options.datasets is not None else default_datasets)
    if not names:
        raise UserError("--datasets is empty; name demo and/or magnetic_tile")
    return named_datasets(names)


def run_main(body: Any, options: Any) -> int:
    """Run ``body(options)`` the way the training scripts run: a UserError is one line and exit code 2."""
    def work(args: list[str]) -> None:
        body(options)

    return run_command(["--debug"] if options.debug else [], "", work,
                       "interrupted: rerun the same command to continue; finished runs are kept")