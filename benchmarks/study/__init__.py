"""The memory studies' machinery, shared by benchmarks/memory_ablation.py and memory_study.py.

A *cell* is one normal training run (dataset x student x variant x seed), launched as a
subprocess of trainRM_ST.py / trainRM_RD.py with its own ``output.dir``:

    {out}/runs/{dataset}/{student}/{variant folder}/seed{seed}/

The variant folder is named by the variant's overrides ("default" when there are none), so the
ablation's memory-on runs are the study's default runs when both use the same ``--out``, and a
run is never trained twice. A cell whose results.json already matches its config (the engine's
own test, :func:`engine.records.finished_results`, without re-reading the images: replacing a
dataset's files under a finished study needs a new ``--out``) is reused without starting a
process, so a killed study continues where it stopped when the same command is run again.

A *paired difference* compares two variants trained with the same seed (same train/validation
split, exemplar set and initialisation): d_s = variant_s - reference_s, reported as the mean of
d over seeds with a two-sided t-interval, mean +- t_{(1+c)/2, n-1} * sd(d) / sqrt(n).

    cells.py       what to run: datasets, variants, cells, their script arguments
    launcher.py    training the cells (one after another, or several at once), reusing finished ones
    statistics.py  paired differences over seeds and their intervals
    tables.py      the CSV, Markdown and PNG outputs
    cli.py         the options both studies take
"""
