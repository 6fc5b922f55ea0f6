"""Training a study's cells: each one a process of its training script, one after another or
several at once, a finished cell reused without starting one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from benchmarks.study.cells import SCRIPTS, Cell, CellResult
from benchmarks.study.statistics import METRICS
from engine.report import mean_row
from utils.errors import UserError

if TYPE_CHECKING:
    from engine.config import RunSettings


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
        done[cell] = CellResult(results, mean_row(results, METRICS), trained)
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
