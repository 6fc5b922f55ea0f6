"""The official on-disk layouts of the benchmarks, turned into lists of ``Sample``.

Each indexer reads one category's official train (normal only) and test splits; the
validation slice is cut from train later by the caller. Layouts (``root`` = data.root):

- mvtec, mpdd, demo: ``<cat>/train/good/*``, ``<cat>/test/<good|defect>/*``,
  masks ``<cat>/ground_truth/<defect>/<stem>_mask.png``.
- btad: ``<01|02|03>/train/ok/*``, ``<cat>/test/<ok|ko>/*``, masks
  ``<cat>/ground_truth/ko/<stem>.<png|bmp>`` (same stem as the image).
- mvtec3d (RGB only): ``<cat>/train/good/rgb/*.png``, ``<cat>/test/<type>/rgb/*.png``,
  masks ``<cat>/test/<type>/gt/<same name>``; xyz/ and the validation/ folder are not used.
- eyecandies: the Pipelime "underfolder" layout of the official download,
  ``<Cat>/train/data/<id>_image_0.png`` and ``<Cat>/test_public/data/<id>_image_0.png`` with
  ``<id>_mask.png`` and ``<id>_metadata.yaml`` (key ``anomalous``: 0/1). Each item has six
  lighting images image_0..image_5; we use image_0 (EYECANDIES_IMAGE_KEY) for every split.
  test_public is the test set (test_private has no public labels); val/ is not used.
- visa: ``split_csv/1cls.csv`` (columns object,split,label,image,mask; paths relative to
  root; label normal/anomaly), i.e. the published one-class split; masks binarised with > 0.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from datasets.categories import (BTAD_CATEGORIES, EYECANDIES_CATEGORIES, MPDD_CATEGORIES, MVTEC3D_CATEGORIES,
                                 MVTEC_CATEGORIES, VISA_CATEGORIES)
from datasets.images import IMAGE_EXTENSIONS, list_images
from datasets.samples import Sample
from utils.errors import UserError

EYECANDIES_IMAGE_KEY = "image_0"


@dataclass(frozen=True)
class CategoryIndex:
    """A category's official splits: ``train`` holds normal images only."""

    train: list[Sample]
    test: list[Sample]


@dataclass(frozen=True)
class Benchmark:
    """What we know about one benchmark: its name, where to get it, its categories, its layout."""

    title: str
    url: str
    categories: tuple[str, ...]
    hint: str  # what data.root must contain, with {cat} standing for the category
    index: Callable[[Path, str], CategoryIndex]
    required: Callable[[Path, str], Path]  # the path whose absence means "not downloaded"


def _images_or_error(folder: Path, what: str) -> list[Path]:
    images = list_images(folder)
    if not images:
        state = "is empty" if folder.is_dir() else "does not exist"
        raise UserError(f"{what} folder {folder} {state}; it must hold the category's images (re-extract the dataset)")
    return images


def find_with_stem(folder: Path, stem: str) -> Path | None:
    """The file ``folder/<stem>.<any image extension>`` (PNG preferred), or None."""
    for ext in sorted(IMAGE_EXTENSIONS, key=lambda e: (e != ".png", e)):
        for candidate in (folder / f"{stem}{ext}", folder / f"{stem}{ext.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def _missing_mask(image: Path, expected: Path) -> UserError:
    return UserError(
        f"defect image {image} has no ground-truth mask (expected {expected}); restore it from the original archive"
    )


def subdirs(folder: Path) -> list[Path]:
    """Visible sub-folders of ``folder``, sorted by name (empty if it does not exist)."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) if folder.is_dir() else []


def _nonempty_test(test: list[Sample], folder: Path) -> list[Sample]:
    if not test:
        raise UserError(f"no test images under {folder}; the category is incomplete, re-extract the dataset")
    return test


def index_mvtec(root: Path, category: str) -> CategoryIndex:
    """MVTec AD layout (also MPDD and the demo)."""
    cat = root / category
    train = [Sample(p, 0) for p in _images_or_error(cat / "train" / "good", "train")]
    test: list[Sample] = []
    for defect_dir in subdirs(cat / "test"):
        defect = defect_dir.name
        for img in list_images(defect_dir):
            if defect == "good":
                test.append(Sample(img, 0))
                continue
            gt_dir = cat / "ground_truth" / defect
            mask = find_with_stem(gt_dir, f"{img.stem}_mask")
            if mask is None:
                raise _missing_mask(img, gt_dir / f"{img.stem}_mask.png")
            test.append(Sample(img, 1, mask, defect))
    return CategoryIndex(train, _nonempty_test(test, cat / "test"))


def index_btad(root: Path, category: str) -> CategoryIndex:
    """BTAD layout: ok/ko folders, masks with the image's stem."""
    cat = root / category
    train = [Sample(p, 0) for p in _images_or_error(cat / "train" / "ok", "train")]
    test = [Sample(p, 0) for p in list_images(cat / "test" / "ok")]
    gt_dir = cat / "ground_truth" / "ko"
    for img in list_images(cat / "test" / "ko"):
        mask = find_with_stem(gt_dir, img.stem)
        if mask is None:
            raise _missing_mask(img, gt_dir / f"{img.stem}.png")
        test.append(Sample(img, 1, mask, "ko"))
    return CategoryIndex(train, _nonempty_test(test, cat / "test"))


def index_mvtec3d(root: Path, category: str) -> CategoryIndex:
    """MVTec 3D-AD layout, RGB images only."""
    cat = root / category
    train = [Sample(p, 0) for p in _images_or_error(cat / "train" / "good" / "rgb", "train")]
    test: list[Sample] = []
    for defect_dir in subdirs(cat / "test"):
        defect = defect_dir.name
        for img in list_images(defect_dir / "rgb"):
            if defect == "good":
                test.append(Sample(img, 0))
                continue
            mask = find_with_stem(defect_dir / "gt", img.stem)
            if mask is None:
                raise _missing_mask(img, defect_dir / "gt" / img.name)
            test.append(Sample(img, 1, mask, defect))
    return CategoryIndex(train, _nonempty_test(test, cat / "test"))


def _eyecandies_images(folder: Path) -> list[Path]:
    suffix = f"_{EYECANDIES_IMAGE_KEY}"
    return [p for p in list_images(folder) if p.stem.endswith(suffix)]


def index_eyecandies(root: Path, category: str) -> CategoryIndex:
    """Eyecandies layout (Pipelime underfolders), RGB image_0 only, test_public as test."""
    cat = root / category
    train_dir = cat / "train" / "data"
    train = [Sample(p, 0) for p in _eyecandies_images(train_dir)]
    if not train:
        raise UserError(f"no *_{EYECANDIES_IMAGE_KEY}.png images in {train_dir}; the category is incomplete, re-extract it")
    data = cat / "test_public" / "data"
    test: list[Sample] = []
    for img in _eyecandies_images(data):
        item_id = img.stem[: -len(EYECANDIES_IMAGE_KEY) - 1]
        meta_path = data / f"{item_id}_metadata.yaml"
        try:
            meta = yaml.safe_load(meta_path.read_text())
            anomalous = int(bool(int(meta["anomalous"])))
        except FileNotFoundError:
            raise UserError(f"Eyecandies metadata {meta_path} is missing; re-extract the category") from None
        except (yaml.YAMLError, KeyError, TypeError, ValueError):
            raise UserError(
                f"Eyecandies metadata {meta_path} has no valid 'anomalous: 0/1' entry; re-extract the category"
            ) from None
        if not anomalous:
            test.append(Sample(img, 0))
            continue
        mask = find_with_stem(data, f"{item_id}_mask")
        if mask is None:
            raise _missing_mask(img, data / f"{item_id}_mask.png")
        test.append(Sample(img, 1, mask, "anomalous"))
    return CategoryIndex(train, _nonempty_test(test, data))


VISA_SPLIT_CSV = Path("split_csv") / "1cls.csv"


def index_visa(root: Path, category: str) -> CategoryIndex:
    """VisA one-class split, read from ``split_csv/1cls.csv``."""
    csv_path = root / VISA_SPLIT_CSV
    try:
        with csv_path.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if (r.get("object") or "").strip() == category]
    except OSError as exc:
        raise UserError(f"cannot read the VisA split file {csv_path} ({exc}); re-extract VisA") from None
    if rows and not {"split", "label", "image", "mask"} <= set(rows[0]):
        raise UserError(f"{csv_path} lacks the columns object,split,label,image,mask; use the 1cls.csv shipped with VisA")
    train: list[Sample] = []
    test: list[Sample] = []
    for r in rows:
        image = root / r["image"].strip()
        if not image.is_file():
            raise UserError(f"VisA image {image} listed in {csv_path} does not exist; re-extract VisA into {root}")
        label = 1 if r["label"].strip().lower() == "anomaly" else 0
        mask = None
        if label:
            rel = (r["mask"] or "").strip()
            mask = root / rel if rel else None
            if mask is None or not mask.is_file():
                raise _missing_mask(image, mask if mask is not None else root / category / "Data" / "Masks")
        split = r["split"].strip().lower()
        if split == "train":
            if label:
                raise UserError(f"{csv_path} lists the anomalous image {image} in the train split; use VisA's one-class 1cls.csv")
            train.append(Sample(image, 0))
        elif split == "test":
            test.append(Sample(image, label, mask, "anomaly" if label else "good", mask_nonzero=True))
        else:
            raise UserError(f"{csv_path} has an unknown split '{r['split']}' for {image}; expected train or test")
    if not train:
        raise UserError(f"{csv_path} lists no train images for '{category}'; use VisA's one-class 1cls.csv")
    return CategoryIndex(train, _nonempty_test(test, root / category))




def _cat_dir(root: Path, category: str) -> Path:
    return root / category


BENCHMARKS: dict[str, Benchmark] = {
    "mvtec": Benchmark(
        "MVTec AD", "https://www.mvtec.com/company/research/datasets/mvtec-ad", MVTEC_CATEGORIES,
        "{cat}/train/good/", index_mvtec, _cat_dir,
    ),
    "mpdd": Benchmark(
        "MPDD", "https://github.com/stepanje/MPDD", MPDD_CATEGORIES,
        "{cat}/train/good/", index_mvtec, _cat_dir,
    ),
    "btad": Benchmark(
        "BTAD", "https://github.com/pankajmishra000/VT-ADL", BTAD_CATEGORIES,
        "{cat}/train/ok/", index_btad, _cat_dir,
    ),
    "mvtec3d": Benchmark(
        "MVTec 3D-AD", "https://www.mvtec.com/company/research/datasets/mvtec-3d-ad", MVTEC3D_CATEGORIES,
        "{cat}/train/good/rgb/", index_mvtec3d, _cat_dir,
    ),
    "eyecandies": Benchmark(
        "Eyecandies", "https://eyecan-ai.github.io/eyecandies/download", EYECANDIES_CATEGORIES,
        "{cat}/train/data/ and {cat}/test_public/data/", index_eyecandies, _cat_dir,
    ),
    "visa": Benchmark(
        "VisA", "https://github.com/amazon-science/spot-diff", VISA_CATEGORIES,
        "split_csv/1cls.csv and {cat}/Data/", index_visa, lambda root, cat: root / VISA_SPLIT_CSV,
    ),
}


def categories_on_disk(dataset: str, root: Path) -> list[str]:
    """Category folders present under ``root`` for ``dataset`` (sub-folders having the layout's train part)."""
    part = "Data" if dataset == "visa" else "train"
    return [d.name for d in subdirs(root) if (d / part).is_dir()]
