"""One category's datasets: the train, validation and test splits of any registered layout.

    splits = build_datasets("mvtec", "data/mvtec", "bottle", image_size=256, val_fraction=0.1, seed=0)
    item = splits.test[0]   # {"image", "mask", "label", "path", "has_mask", "defect"}

train/val is a seeded split of the official train (normal) images; the test split is the
official test set and is never used for validation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from datasets.demo import DEMO_CATEGORIES, ensure_demo_dataset
from datasets.download import ensure_downloaded
from datasets.folder import folder_categories, index_folder
from datasets.layouts import BENCHMARKS, CategoryIndex, categories_on_disk, index_mvtec
from datasets.registry import DATASET_NAMES
from datasets.samples import AnomalyDataset, check_files, seeded_split
from utils.errors import UserError



@dataclass
class DatasetSplits:
    """The three splits of one category; memory exemplars are drawn from ``train`` only.

    ``scoring`` names the metrics the benchmark reports (datasets.layouts.Benchmark.scoring);
    ``unlabelled`` holds its test images without public labels, by split name."""

    train: AnomalyDataset
    val: AnomalyDataset
    test: AnomalyDataset
    scoring: str = "mvtec"
    unlabelled: dict[str, list[Path]] = field(default_factory=dict)


def _check_name(dataset: str) -> None:
    if dataset not in DATASET_NAMES:
        raise UserError(f"unknown dataset '{dataset}'; choose one of: {', '.join(DATASET_NAMES)}")


def list_categories(dataset: str, root: str | Path) -> list[str]:
    """The categories of ``dataset``: the official list for a benchmark, the demo's three,
    or for "folder" the sub-folders of ``root`` that contain a good/ folder."""
    _check_name(dataset)
    if dataset == "demo":
        return list(DEMO_CATEGORIES)
    if dataset != "folder":
        return list(BENCHMARKS[dataset].categories)
    root = Path(root).expanduser()
    categories = folder_categories(root)
    if not categories:
        raise UserError(
            f"no categories under {root}: a category is a sub-folder with a good/ folder of normal images; "
            "set data.root to the folder that holds <category>/good/"
        )
    return categories


def _index(dataset: str, root: Path, category: str, seed: int, download: bool) -> CategoryIndex:
    if dataset == "demo":
        if category not in DEMO_CATEGORIES:
            raise UserError(f"unknown demo category '{category}'; available: {', '.join(DEMO_CATEGORIES)}")
        ensure_demo_dataset(root)
        return index_mvtec(root, category)
    if dataset == "folder":
        if not root.is_dir():
            raise UserError(f"folder dataset root {root} does not exist; set data.root to the folder that holds <category>/good/")
        available = folder_categories(root)
        if category not in available:
            raise UserError(
                f"category '{category}' not found in {root}; available: {', '.join(available) or 'none'} "
                "(a category is a sub-folder with a good/ folder)"
            )
        return index_folder(root, category, seed)

    bench = BENCHMARKS[dataset]
    on_disk = categories_on_disk(dataset, root)
    if category not in bench.categories and category not in on_disk:
        available = list(bench.categories) + [c for c in on_disk if c not in bench.categories]
        raise UserError(f"unknown {bench.title} category '{category}'; available: {', '.join(available)}")
    required = bench.required(root, category)
    if not required.exists() and download:
        ensure_downloaded(dataset, root)
    if not required.exists():
        raise UserError(
            f"{bench.title} data not found: {required} does not exist; download {bench.title} from {bench.url} "
            f"and extract it so that data.root ({root}) contains {bench.hint.format(cat=category)}"
        )
    return bench.index(root, category)


def build_datasets(
    dataset: str,
    root: str | Path,
    category: str,
    image_size: int,
    val_fraction: float,
    seed: int,
    download: bool = False,
) -> DatasetSplits:
    """Index one category and return its train/val/test datasets.

    train and val are a ``seed``-ed random split of the official train (normal) images, val
    holding round(val_fraction * n) of them (at least 1 when val_fraction > 0 and n >= 2,
    never all); a layout that ships a validation folder uses it instead, whole, and keeps every
    train image (``val_fraction`` is then not read). The test split is the official one. For "demo" the data is generated into
    ``root`` on first use. Missing data is downloaded when ``download`` is set and
    datasets.download offers it; otherwise (and for unreadable files, missing masks, unknown
    categories) a UserError says what is wrong and how to fix it.
    """
    _check_name(dataset)
    if not 0.0 <= float(val_fraction) < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    root = Path(root).expanduser()
    index = _index(dataset, root, category, int(seed), download)
    if index.validation is None:
        train, val = seeded_split(index.train, float(val_fraction), int(seed))
    else:
        train, val = index.train, index.validation
    check_files(train + val + index.test)
    return DatasetSplits(
        train=AnomalyDataset(train, image_size),
        val=AnomalyDataset(val, image_size),
        test=AnomalyDataset(index.test, image_size),
        scoring=BENCHMARKS[dataset].scoring if dataset in BENCHMARKS else "mvtec",
        unlabelled=index.unlabelled,
    )
