"""What a study runs: its datasets, variants and cells, and each cell's script arguments."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from utils.errors import UserError

REPO = Path(__file__).resolve().parent.parent.parent
# Where the development machines keep the project's shared data (the magnetic tile, the ImageNet
# MobileNetV2 weights): the default of the studies' --shared option.
DEFAULT_SHARED = REPO.parent / "shared"
SCRIPTS = {"st": REPO / "trainRM_ST.py", "rd": REPO / "trainRM_RD.py"}
STUDENTS = tuple(SCRIPTS)


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset of the study: ``name`` labels tables and folders, ``args`` are script arguments."""

    name: str
    args: tuple[str, ...]

    @property
    def root(self) -> Path | None:
        """The dataset's ``data.root``, as its arguments give it."""
        given = [arg.split("=", 1)[1] for arg in self.args if arg.startswith("data.root=")]
        return Path(given[-1]).expanduser().resolve() if given else None


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


def named_datasets(names: Sequence[str], shared: Path) -> list[DatasetSpec]:
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


@dataclass
class CellResult:
    """A finished cell: its per-category results.json contents and their mean per metric."""

    results: list[dict[str, Any]]
    metrics: dict[str, float | None]
    trained: bool
