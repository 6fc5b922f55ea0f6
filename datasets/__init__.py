"""What is read: the benchmarks' official splits, the user's own folders and a generated demo,
all yielding items of one form (datasets/samples.py).

    from datasets.build import build_datasets   # one category's train / val / test splits
    from datasets.registry import DATASET_NAMES # names only, no torch: what the config may choose

This package's own namespace stays empty so that importing :mod:`datasets.registry` loads no torch.
"""
