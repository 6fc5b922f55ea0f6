"""The official on-disk layouts of the benchmarks, turned into lists of ``Sample``.

Each indexer reads one category's official train (normal only) and test splits, and the
official validation folder where the layout ships one (MVTec 3D-AD, MVTec LOCO AD, MVTec AD 2);
otherwise the validation slice is cut from train later by the caller. Layouts (``root`` =
data.root):

- mvtec, mpdd, demo: ``<cat>/train/good/*``, ``<cat>/test/<good|defect>/*``,
  masks ``<cat>/ground_truth/<defect>/<stem>_mask.png``.
- btad: ``<01|02|03>/train/ok/*``, ``<cat>/test/<ok|ko>/*``, masks
  ``<cat>/ground_truth/ko/<stem>.<png|bmp>`` (same stem as the image).
- mvtec3d (RGB only): ``<cat>/train/good/rgb/*.png``, ``<cat>/validation/good/rgb/*.png``,
  ``<cat>/test/<type>/rgb/*.png``, masks ``<cat>/test/<type>/gt/<same name>``; xyz/ is not used.
- mvtec_loco: ``<cat>/{train,validation}/good/*.png``,
  ``<cat>/test/{good,logical_anomalies,structural_anomalies}/NNN.png``, masks
  ``<cat>/ground_truth/<type>/NNN/000.png, 001.png, ...`` (one file per defect, painted with
  the defect's pixel value) and ``<cat>/defects_config.json`` (each defect's pixel value and
  saturation rule, read by the sPRO metric: :func:`loco_saturation_rules`).
- mvtec_ad2: ``<cat>/{train,validation}/good/*.png``, ``<cat>/test_public/{good,bad}/*.png``,
  masks ``<cat>/test_public/ground_truth/bad/<stem>_mask.png``; the unlabelled
  ``<cat>/test_private/*.png`` and ``<cat>/test_private_mixed/*.png`` are listed apart (for the
  submission writer).
- eyecandies: the Pipelime "underfolder" layout of the official download,
  ``<Cat>/train/data/<id>_image_0.png`` and ``<Cat>/test_public/data/<id>_image_0.png`` with
  ``<id>_mask.png`` and ``<id>_metadata.yaml`` (key ``anomalous``: 0/1). Each item has six
  lighting images image_0..image_5; we use image_0 (EYECANDIES_IMAGE_KEY) for every split.
  test_public is the test set (test_private has no public labels); the normal items of val/ are
  the validation images.
- visa: ``split_csv/1cls.csv`` (columns object,split,label,image,mask; paths relative to
  root; label normal/anomaly), i.e. the published one-class split; masks binarised with > 0.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from datasets.categories import (BTAD_CATEGORIES, EYECANDIES_CATEGORIES, MPDD_CATEGORIES, MVTEC3D_CATEGORIES,
                                 MVTEC_AD2_CATEGORIES, MVTEC_CATEGORIES, MVTEC_LOCO_CATEGORIES, VISA_CATEGORIES)
from datasets.images import IMAGE_EXTENSIONS, list_images
from datasets.samples import Sample
from utils.errors import UserError

EYECANDIES_IMAGE_KEY = "image_0"


@dataclass(frozen=True)
class CategoryIndex:
    """A category's official splits: ``train`` holds normal images only; ``validation`` the
    official validation images (normal), None when the layout ships none; ``unlabelled`` test
    images without public labels, by split name."""

    train: list[Sample]
    test: list[Sample]
    validation: list[Sample] | None = None
    unlabelled: dict[str, list[Path]] = field(default_factory=dict)


@dataclass(frozen=True)
class Benchmark:
    """What we know about one benchmark: its name, where to get it, its categories, its layout."""

    title: str
    url: str
    categories: tuple[str, ...]
    hint: str  # what data.root must contain, with {cat} standing for the category
    index: Callable[[Path, str], CategoryIndex]
    required: Callable[[Path, str], Path]  # the path whose absence means "not downloaded"
    scoring: str = "mvtec"  # which metrics: "mvtec" (at image_size), "loco" or "ad2" (at the masks' own size)


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


def _official_validation(folder: Path) -> list[Sample]:
    return [Sample(p, 0) for p in _images_or_error(folder, "validation")]


def index_mvtec3d(root: Path, category: str) -> CategoryIndex:
    """MVTec 3D-AD layout, RGB images only."""
    cat = root / category
    train = [Sample(p, 0) for p in _images_or_error(cat / "train" / "good" / "rgb", "train")]
    validation = _official_validation(cat / "validation" / "good" / "rgb")
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
    return CategoryIndex(train, _nonempty_test(test, cat / "test"), validation)


def _eyecandies_images(folder: Path) -> list[Path]:
    suffix = f"_{EYECANDIES_IMAGE_KEY}"
    return [p for p in list_images(folder) if p.stem.endswith(suffix)]


def _eyecandies_anomalous(data: Path, item_id: str) -> bool:
    """The ``anomalous`` flag of an Eyecandies item, from ``<id>_metadata.yaml``."""
    meta_path = data / f"{item_id}_metadata.yaml"
    try:
        meta = yaml.safe_load(meta_path.read_text())
        return bool(int(meta["anomalous"]))
    except FileNotFoundError:
        raise UserError(f"Eyecandies metadata {meta_path} is missing; re-extract the category") from None
    except (yaml.YAMLError, KeyError, TypeError, ValueError):
        raise UserError(
            f"Eyecandies metadata {meta_path} has no valid 'anomalous: 0/1' entry; re-extract the category"
        ) from None


def _eyecandies_item_id(image: Path) -> str:
    return image.stem[: -len(EYECANDIES_IMAGE_KEY) - 1]


def index_eyecandies(root: Path, category: str) -> CategoryIndex:
    """Eyecandies layout (Pipelime underfolders), RGB image_0 only, test_public as test, the
    normal items of val as validation."""
    cat = root / category
    train_dir = cat / "train" / "data"
    train = [Sample(p, 0) for p in _eyecandies_images(train_dir)]
    if not train:
        raise UserError(f"no *_{EYECANDIES_IMAGE_KEY}.png images in {train_dir}; the category is incomplete, re-extract it")
    val_dir = cat / "val" / "data"
    validation = [Sample(p, 0) for p in _eyecandies_images(val_dir)
                  if not _eyecandies_anomalous(val_dir, _eyecandies_item_id(p))] or None
    data = cat / "test_public" / "data"
    test: list[Sample] = []
    for img in _eyecandies_images(data):
        item_id = _eyecandies_item_id(img)
        if not _eyecandies_anomalous(data, item_id):
            test.append(Sample(img, 0))
            continue
        mask = find_with_stem(data, f"{item_id}_mask")
        if mask is None:
            raise _missing_mask(img, data / f"{item_id}_mask.png")
        test.append(Sample(img, 1, mask, "anomalous"))
    return CategoryIndex(train, _nonempty_test(test, data), validation)


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




LOCO_ANOMALY_TYPES = ("logical_anomalies", "structural_anomalies")
LOCO_DEFECTS_CONFIG = "defects_config.json"


@dataclass(frozen=True)
class SaturationRule:
    """How much of one MVTec LOCO AD defect must be covered for full credit (sPRO): at most
    ``threshold`` pixels, or ``threshold`` x its area (floored) when ``relative``."""

    defect: str
    threshold: float
    relative: bool

    def saturation(self, area: int) -> float:
        """The overlap, in pixels, at which a defect of ``area`` pixels counts as found (at least
        one pixel: a tiny relative share would otherwise round down to nothing)."""
        pixels = float(int(self.threshold * area)) if self.relative else float(min(self.threshold, area))
        return max(pixels, 1.0)


def loco_saturation_rules(root: Path, category: str) -> dict[int, SaturationRule]:
    """The saturation rule of each defect pixel value, from ``<cat>/defects_config.json``."""
    path = root / category / LOCO_DEFECTS_CONFIG
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"MVTec LOCO AD {path} is missing: the sPRO metric needs each defect's saturation; "
                        "re-extract the category") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path} ({e}); re-extract the category") from None
    rules: dict[int, SaturationRule] = {}
    try:
        for entry in entries:
            rules[int(entry["pixel_value"])] = SaturationRule(
                str(entry["defect_name"]), float(entry["saturation_threshold"]), bool(entry["relative_saturation"]))
    except (TypeError, KeyError, ValueError):
        raise UserError(f"{path} must be a list of {{defect_name, pixel_value, saturation_threshold, "
                        "relative_saturation}} entries; re-extract the category") from None
    return rules


def index_mvtec_loco(root: Path, category: str) -> CategoryIndex:
    """MVTec LOCO AD layout: one mask folder per defective image, one mask file per defect."""
    cat = root / category
    loco_saturation_rules(root, category)  # refuse a category without a readable defects_config.json now
    train = [Sample(p, 0) for p in _images_or_error(cat / "train" / "good", "train")]
    validation = _official_validation(cat / "validation" / "good")
    test = [Sample(p, 0) for p in list_images(cat / "test" / "good")]
    for kind in LOCO_ANOMALY_TYPES:
        images = list_images(cat / "test" / kind)
        stems = {img.stem for img in images}
        gt = cat / "ground_truth" / kind
        for folder in subdirs(gt):
            if folder.name not in stems:
                raise UserError(f"mask folder {folder} has no image {cat / 'test' / kind / folder.name}.png; "
                                "restore the image from the original archive or remove the folder")
        for img in images:
            masks = list_images(gt / img.stem)
            if not masks:
                raise _missing_mask(img, gt / img.stem / "000.png")
            test.append(Sample(img, 1, masks[0], kind, mask_nonzero=True, extra_masks=tuple(masks[1:])))
    return CategoryIndex(train, _nonempty_test(test, cat / "test"), validation)


AD2_UNLABELLED = ("test_private", "test_private_mixed")


def index_mvtec_ad2(root: Path, category: str) -> CategoryIndex:
    """MVTec AD 2 layout: test_public is the labelled test set; the private sets are listed apart."""
    cat = root / category
    train = [Sample(p, 0) for p in _images_or_error(cat / "train" / "good", "train")]
    validation = _official_validation(cat / "validation" / "good")
    public = cat / "test_public"
    test = [Sample(p, 0) for p in list_images(public / "good")]
    gt = public / "ground_truth" / "bad"
    for img in list_images(public / "bad"):
        mask = find_with_stem(gt, f"{img.stem}_mask")
        if mask is None:
            raise _missing_mask(img, gt / f"{img.stem}_mask.png")
        test.append(Sample(img, 1, mask, "bad"))
    unlabelled = {split: list_images(cat / split) for split in AD2_UNLABELLED}
    return CategoryIndex(train, _nonempty_test(test, public), validation, unlabelled)


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
    "mvtec_loco": Benchmark(
        "MVTec LOCO AD", "https://www.mvtec.com/company/research/datasets/mvtec-loco", MVTEC_LOCO_CATEGORIES,
        "{cat}/train/good/, {cat}/validation/good/, {cat}/test/, {cat}/ground_truth/ and {cat}/defects_config.json",
        index_mvtec_loco, _cat_dir, scoring="loco",
    ),
    "mvtec_ad2": Benchmark(
        "MVTec AD 2", "https://www.mvtec.com/company/research/datasets/mvtec-ad-2", MVTEC_AD2_CATEGORIES,
        "{cat}/train/good/, {cat}/validation/good/ and {cat}/test_public/", index_mvtec_ad2, _cat_dir,
        scoring="ad2",
    ),
}


def categories_on_disk(dataset: str, root: Path) -> list[str]:
    """Category folders present under ``root`` for ``dataset`` (sub-folders having the layout's train part)."""
    part = "Data" if dataset == "visa" else "train"
    return [d.name for d in subdirs(root) if (d / part).is_dir()]
