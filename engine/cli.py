"""Command-line entry shared by trainRM_ST.py and trainRM_RD.py."""
from __future__ import annotations

import sys
from typing import Any, Sequence

from engine.config import SCHEMA, RunSettings, load_config
from utils.errors import UserError, run_command

USAGE = """usage: python {script} [override.yaml ...] [section.key=value ...] [--debug]

Reads config.yaml (and the override files, in order), then applies key=value overrides.
Example: python {script} data.category=bottle train.epochs=10 memory.enabled=false
Keys:
{keys}"""


def _usage(method: str) -> str:
    keys = "\n".join(f"  {key:<26} {spec.doc}" for key, spec in SCHEMA.items())
    return USAGE.format(script=f"trainRM_{method.upper()}.py", keys=keys)


def main(method: str, argv: Sequence[str]) -> int:
    """Run one category or all of them, print the table, name the results file; return the exit code.

    A UserError becomes one line on stderr and exit code 2 (``--debug`` shows the traceback).
    """
    try:
        return run_command(argv, _usage(method), lambda args: _run(method, args),
                           "interrupted: rerun the same command to continue from the last finished epoch")
    finally:
        if "torch.distributed" in sys.modules:  # only a torchrun world ever joined a process group
            from utils.distributed import teardown

            teardown()


def run_categories(settings: RunSettings) -> list[dict[str, Any]] | None:
    """Run the configured category, or every category of the dataset for ``data.category=all``.

    A sweep trains each category whose run folder it can lock (utils/locks.py) and skips, for now,
    those another process holds, so two sweeps over one ``output.dir`` share the work; under
    torchrun with ``train.parallel=categories`` every process walks the same list that way. At
    the end the skipped categories are read back once their holders have finished them (under
    torchrun, rank 0 gathers after all ranks are done), so the sweep's table and summary are
    written once, and complete. Returns the results on rank 0 (and in a single process), else None.
    """
    from datasets.build import list_categories
    from engine.records import finished_results, run_directory
    from engine.run import run_category
    from utils.distributed import barrier, current_world, setup

    world = current_world()
    device = setup(world)
    if device is not None and settings.train.device != "cpu":
        settings = settings.replace({"train.device": "cuda"})  # this rank's own GPU, made current by setup()
    sweep = settings.data.category == "all"
    if sweep:
        categories = list_categories(settings.data.dataset, settings.data.root)
    else:
        categories = [settings.data.category]
    by_category = world.size > 1 and settings.train.parallel == "categories"
    results = [run_category(settings, category, world, skip_if_busy=sweep or by_category) for category in categories]
    if by_category:
        barrier()  # every category is finished, or held by a process outside this sweep
    if not world.is_main:
        return None
    gathered, busy = [], []
    for category, mine in zip(categories, results):
        found = mine or finished_results(run_directory(settings, category), settings)
        if found is None:
            busy.append(category)
        gathered.append(found)
    if busy:
        raise UserError(f"{len(busy)} categor{'y' if len(busy) == 1 else 'ies'} ({', '.join(busy)}) not finished: "
                        "their run folders were in use by another process; the others are done; rerun the same "
                        "command when that process has finished")
    return gathered


def _run(method: str, args: list[str]) -> None:
    settings = load_config(method, args)
    # Imported here so that `--help` and config errors answer at once, before torch loads.
    from engine.records import SUMMARY_FILE, method_directory
    from engine.report import columns_for, format_table, mean_row, write_summary
    from utils.io import write_json

    sweep = settings.data.category == "all"
    results = run_categories(settings)
    if results is None:  # another rank of a torchrun world: rank 0 reports
        return None
    name, data = settings.method_name, settings.data
    columns = columns_for(data.dataset)
    print()
    print(format_table(f"{name} on {data.dataset} ({settings.model.backbone}, {data.image_size} px)", results,
                       with_mean=sweep, columns=columns))
    report, _ = write_summary(settings.output.dir)  # every method and dataset under output.dir, with this run
    print(f"report: {report} (and summary.csv)")
    if sweep:
        summary = method_directory(settings) / SUMMARY_FILE
        write_json(summary, {"method": name, "dataset": data.dataset, "categories": results,
                             "mean": mean_row(results, columns)})
        print(f"summary: {summary}")
    else:
        print(f"results: {results[0]['results_path']}")
    return None
