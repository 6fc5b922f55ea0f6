"""Command-line entry shared by trainRM_ST.py and trainRM_RD.py."""
from __future__ import annotations

import sys
from typing import Any, Sequence

from engine.config import SCHEMA, load_config
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


def run_categories(method: str, config: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Run the configured category, or every category of the dataset for ``data.category=all``.

    Under torchrun with ``train.parallel=categories`` every process walks the same list and trains
    each category whose run folder it can lock (utils/runlock.py), skipping those another process
    holds; once all are done, rank 0 gathers every category's results.json, so the sweep's
    summary is written once. Returns the results on rank 0 (and in a single process), else None.
    """
    from datasets.build import list_categories
    from utils.distributed import barrier, current_world, setup
    from engine.run import finished_results, run_category, run_directory
    from utils.errors import UserError

    world = current_world()
    device = setup(world)
    if device is not None and config["train.device"] != "cpu":
        config = {**config, "train.device": "cuda"}  # this rank's own GPU, made current by setup()
    if config["data.category"] == "all":
        categories = list_categories(config["data.dataset"], config["data.root"])
    else:
        categories = [config["data.category"]]
    by_category = world.size > 1 and config["train.parallel"] == "categories"
    results = [run_category(method, config, category, world, skip_if_busy=by_category) for category in categories]
    if not by_category:
        return results if world.is_main else None
    barrier()  # every category is finished, or held by a process outside this sweep
    if not world.is_main:
        return None
    gathered = []
    for category, mine in zip(categories, results):
        found = mine or finished_results(run_directory(config, method, category), config)
        if found is None:
            raise UserError(f"category {category} was not finished by this sweep (its run folder was in use by "
                            "another process); rerun the same command when that process is done")
        gathered.append(found)
    return gathered


def _run(method: str, args: list[str]) -> None:
    config = load_config(method, args)
    # Imported here so that `--help` and config errors answer at once, before torch loads.
    from models.registry import method_name
    from engine.run import method_directory
    from utils.io import write_json
    from engine.report import format_table, mean_row, write_summary

    sweep = config["data.category"] == "all"
    results = run_categories(method, config)
    if results is None:  # another rank of a torchrun world: rank 0 reports
        return None
    name = method_name(method, config["memory.enabled"])
    print()
    print(format_table(f"{name} on {config['data.dataset']} ({config['model.backbone']}, "
                       f"{config['data.image_size']} px)", results, with_mean=sweep))
    report, _ = write_summary(config["output.dir"])  # every method and dataset under output.dir, with this run
    print(f"report: {report} (and summary.csv)")
    if sweep:
        summary = method_directory(config, method) / "summary.json"
        write_json(summary, {"method": name, "dataset": config["data.dataset"], "categories": results,
                             "mean": mean_row(results)})
        print(f"summary: {summary}")
    else:
        print(f"results: {results[0]['results_path']}")
    return None
