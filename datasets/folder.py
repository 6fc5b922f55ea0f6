"""The ``folder`` layout: a user's own images, with or without masks.

    root/<category>/good/*                      normal images (train + val, and test-good
                                                when there is no test/good/ folder)
    root/<category>/<defect>/*                  anomalous test images, any number of folders
    root/<category>/test/good/*                 optional separate normal test images
    root/<category>/test/<defect>/*             optional, more anomalous test images
    root/<category>/masks/<defect>/<stem>.*     optional masks, or <stem>_mask.*

Without test/good/, a seeded 20 % of good/ is held out as test-good (TEST_HOLDOUT).
Anomalous images without a mask are allowed: their items have has_mask False and an
all-zero mask, so pixel metrics must skip them. With no anomalous images at all, the test
split holds only good images.
"""

from __future__ import annotations

from pathlib import Path

from datasets.images import list_images
from datasets.layouts import CategoryIndex, find_with_stem, subdirs
from datasets.samples import Sample, seeded_split
from utils.errors import UserError

TEST_HOLDOUT = 0.2
_RESERVED = {"good", "masks", "test"}
# Stream id for the test-good hold-out, so it is independent of the train/val draw.
_HOLDOUT_STREAM = 1


def folder_categories(root: Path) -> list[str]:
    """Sub-folders of ``root`` that look like categories: they contain a good/ folder."""
    return [d.name for d in subdirs(root) if (d / "good").is_dir()]


def _anomalies(defect_dir: Path, masks_root: Path) -> list[Sample]:
    defect = defect_dir.name
    out = []
    for img in list_images(defect_dir):
        mask_dir = masks_root / defect
        mask = find_with_stem(mask_dir, img.stem) or find_with_stem(mask_dir, f"{img.stem}_mask")
        out.append(Sample(img, 1, mask, defect))
    return out


def index_folder(root: Path, category: str, seed: int) -> CategoryIndex:
    """Index ``root/category`` in the folder layout (see the module docstring).

    ``seed`` fixes which good images are held out as test-good when there is no test/good/.
    """
    cat = root / category
    good_dir = cat / "good"
    if not good_dir.is_dir():
        hint = " (it looks like MVTec layout: use dataset 'mvtec')" if (cat / "train" / "good").is_dir() else ""
        raise UserError(f"folder dataset: {good_dir} does not exist{hint}; put the normal images in <data.root>/{category}/good/")
    goods = [Sample(p, 0) for p in list_images(good_dir)]
    if not goods:
        raise UserError(f"folder dataset: {good_dir} holds no images; add normal images (png/jpg/bmp/tif) there")

    test_dir = cat / "test"
    test_goods = [Sample(p, 0) for p in list_images(test_dir / "good")]
    if test_goods:
        train = goods
    else:
        train, test_goods = seeded_split(goods, TEST_HOLDOUT, seed, stream=_HOLDOUT_STREAM)

    masks_root = cat / "masks"
    anomalies: list[Sample] = []
    for d in subdirs(cat):
        if d.name not in _RESERVED:
            anomalies += _anomalies(d, masks_root)
    for d in subdirs(test_dir):
        if d.name != "good":
            anomalies += _anomalies(d, masks_root)
    test = test_goods + anomalies
    if not test:
        raise UserError(
            f"folder dataset: no test images for '{category}' (only one normal image and no defect folders); "
            f"add more images to {good_dir} or a {test_dir / 'good'} folder"
        )
    return CategoryIndex(train, test)
