"""Generators of miniature datasets in each benchmark's real on-disk layout, for tests.

Every generator is deterministic (seeded), writes a few tiny images and returns the dataset
root to pass as data.root. Normal images are a smooth random texture with values in
40..160; a defect is a bright (255) rectangle at a random place, and its mask is exactly
that rectangle (0/255), so a test can check that an image was paired with its own mask.
"""

from __future__ import annotations

import csv
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def texture(rng: np.random.Generator, size: int | tuple[int, int]) -> np.ndarray:
    """A smooth random RGB texture, HxWx3 uint8 with values in 40..160."""
    h, w = (size, size) if isinstance(size, int) else size
    coarse = rng.uniform(40, 160, size=(max(h // 8, 2), max(w // 8, 2), 3)).astype(np.uint8)
    return np.array(Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR))


def defect_box(rng: np.random.Generator, size: int | tuple[int, int]) -> tuple[slice, slice]:
    """A random rectangle covering roughly 6-20 % of an image of ``size``."""
    h, w = (size, size) if isinstance(size, int) else size
    bh, bw = int(rng.integers(h // 4, h // 2)), int(rng.integers(w // 4, w // 2))
    y, x = int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw))
    return slice(y, y + bh), slice(x, x + bw)


def defective(rng: np.random.Generator, size: int | tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(image HxWx3 uint8, mask HxW uint8 0/255): a texture with a bright rectangle and its mask."""
    img = texture(rng, size)
    box = defect_box(rng, size)
    img[box] = 255
    mask = np.zeros(img.shape[:2], dtype=np.uint8)
    mask[box] = 255
    return img, mask


def save(array: np.ndarray, path: Path) -> Path:
    """Write ``array`` (HxWx3 or HxW) to ``path``, creating folders; the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def make_mvtec_folder(
    root: str | Path, category: str = "widget", n_train: int = 8, n_good_test: int = 3, n_defect: int = 3, size: int = 64
) -> Path:
    """Write a tiny MVTec-AD-layout category under ``root`` and return ``root`` (= data.root).

    root/<category>/train/good/000.png .., test/good/, test/<defect>/ with defects alternating
    between types "scratch" and "dent", and ground_truth/<defect>/<stem>_mask.png (0/255).
    """
    root = Path(root)
    rng = np.random.default_rng(zlib.crc32(category.encode()))  # deterministic per category
    cat = root / category
    for i in range(n_train):
        save(texture(rng, size), cat / "train" / "good" / f"{i:03d}.png")
    for i in range(n_good_test):
        save(texture(rng, size), cat / "test" / "good" / f"{i:03d}.png")
    for i in range(n_defect):
        kind = ("scratch", "dent")[i % 2]
        img, mask = defective(rng, size)
        save(img, cat / "test" / kind / f"{i:03d}.png")
        save(mask, cat / "ground_truth" / kind / f"{i:03d}_mask.png")
    return root


def make_btad_folder(
    root: str | Path, category: str = "01", n_train: int = 6, n_good_test: int = 2, n_defect: int = 2,
    size: int = 48, image_ext: str = ".bmp", mask_ext: str = ".png",
) -> Path:
    """Write a tiny BTAD-layout category (train/ok, test/ok|ko, ground_truth/ko/<stem><mask_ext>); return root."""
    root = Path(root)
    rng = np.random.default_rng(1)
    cat = root / category
    for i in range(n_train):
        save(texture(rng, size), cat / "train" / "ok" / f"{i:04d}{image_ext}")
    for i in range(n_good_test):
        save(texture(rng, size), cat / "test" / "ok" / f"{i:04d}{image_ext}")
    for i in range(n_defect):
        img, mask = defective(rng, size)
        save(img, cat / "test" / "ko" / f"{i:04d}{image_ext}")
        save(mask, cat / "ground_truth" / "ko" / f"{i:04d}{mask_ext}")
    return root


def make_mvtec3d_folder(
    root: str | Path, category: str = "bagel", n_train: int = 6, n_good_test: int = 2, n_defect: int = 2, size: int = 48
) -> Path:
    """Write a tiny MVTec-3D-AD-layout category (rgb/, gt/, dummy xyz/ and validation/); return root."""
    root = Path(root)
    rng = np.random.default_rng(2)
    cat = root / category
    for i in range(n_train):
        save(texture(rng, size), cat / "train" / "good" / "rgb" / f"{i:03d}.png")
        (cat / "train" / "good" / "xyz").mkdir(parents=True, exist_ok=True)
        (cat / "train" / "good" / "xyz" / f"{i:03d}.tiff").write_bytes(b"not used")
    for i in range(2):
        save(texture(rng, size), cat / "validation" / "good" / "rgb" / f"{i:03d}.png")
    for i in range(n_good_test):
        save(texture(rng, size), cat / "test" / "good" / "rgb" / f"{i:03d}.png")
        save(np.zeros((size, size), np.uint8), cat / "test" / "good" / "gt" / f"{i:03d}.png")
    for i in range(n_defect):
        kind = ("crack", "hole")[i % 2]
        img, mask = defective(rng, size)
        save(img, cat / "test" / kind / "rgb" / f"{i:03d}.png")
        save(mask, cat / "test" / kind / "gt" / f"{i:03d}.png")
    return root


LOCO_DEFECTS = [  # both saturation kinds, as the official defects_config.json files mix them
    {"defect_name": "missing_part", "pixel_value": 255, "saturation_threshold": 1.0, "relative_saturation": True},
    {"defect_name": "extra_part", "pixel_value": 254, "saturation_threshold": 60, "relative_saturation": False},
    {"defect_name": "scratch", "pixel_value": 253, "saturation_threshold": 0.5, "relative_saturation": True},
]


def make_mvtec_loco_folder(root: str | Path, category: str = "juice_bottle", n_train: int = 6, n_good_test: int = 2,
                           n_defect: int = 2, size: tuple[int, int] = (40, 56)) -> Path:
    """Write a tiny MVTec-LOCO-AD-layout category of non-square images: validation/good,
    logical and structural anomalies, one mask folder per defective image holding one mask file
    per defect (the first image of each type has two), painted with the defect's pixel value,
    and a defects_config.json with both saturation kinds; return root."""
    import json

    root = Path(root)
    rng = np.random.default_rng(5)
    cat = root / category
    for i in range(n_train):
        save(texture(rng, size), cat / "train" / "good" / f"{i:03d}.png")
    for i in range(2):
        save(texture(rng, size), cat / "validation" / "good" / f"{i:03d}.png")
    for i in range(n_good_test):
        save(texture(rng, size), cat / "test" / "good" / f"{i:03d}.png")
    for kind, values in (("logical_anomalies", (255, 254)), ("structural_anomalies", (253, 254))):
        for i in range(n_defect):
            img = texture(rng, size)
            for j, value in enumerate(values[: 2 if i == 0 else 1]):
                box = defect_box(rng, size)
                img[box] = 255
                mask = np.zeros(size, np.uint8)
                mask[box] = value
                save(mask, cat / "ground_truth" / kind / f"{i:03d}" / f"{j:03d}.png")
            save(img, cat / "test" / kind / f"{i:03d}.png")
    (cat / "defects_config.json").write_text(json.dumps(LOCO_DEFECTS))
    return root


def make_mvtec_ad2_folder(root: str | Path, category: str = "vial", n_train: int = 6, n_good_test: int = 2,
                          n_defect: int = 2, size: tuple[int, int] = (44, 60), n_private: int = 2) -> Path:
    """Write a tiny MVTec-AD-2-layout category of non-square images: validation/good,
    test_public/{good,bad} with <stem>_mask.png masks, and the unlabelled test_private and
    test_private_mixed (whose images differ in size, as the real ones may); return root."""
    root = Path(root)
    rng = np.random.default_rng(6)
    cat = root / category
    for i in range(n_train):
        save(texture(rng, size), cat / "train" / "good" / f"{i:03d}_regular.png")
    for i in range(2):
        save(texture(rng, size), cat / "validation" / "good" / f"{i:03d}_regular.png")
    for i in range(n_good_test):
        save(texture(rng, size), cat / "test_public" / "good" / f"{i:03d}_regular.png")
    for i in range(n_defect):
        img, mask = defective(rng, size)
        save(img, cat / "test_public" / "bad" / f"{i:03d}_regular.png")
        save(mask, cat / "test_public" / "ground_truth" / "bad" / f"{i:03d}_regular_mask.png")
    for split in ("test_private", "test_private_mixed"):
        for i in range(n_private):
            save(texture(rng, (size[0] + 4 * i, size[1])), cat / split / f"{i:03d}_regular.png")
    return root


def make_eyecandies_folder(
    root: str | Path, category: str = "CandyCane", n_train: int = 6, n_good_test: int = 2, n_defect: int = 2, size: int = 48
) -> Path:
    """Write a tiny Eyecandies-layout category (Pipelime underfolders: <id>_image_0..2.png,
    <id>_mask.png, <id>_metadata.yaml with 'anomalous') with train/, val/, test_public/; return root."""
    root = Path(root)
    rng = np.random.default_rng(3)
    cat = root / category

    def item(split: str, idx: int, anomalous: bool) -> None:
        data = cat / split / "data"
        img, mask = defective(rng, size) if anomalous else (texture(rng, size), np.zeros((size, size), np.uint8))
        for light in range(3):  # several lighting conditions, only image_0 is used
            save(img if light == 0 else 255 - img, data / f"{idx:03d}_image_{light}.png")
        save(mask, data / f"{idx:03d}_mask.png")
        (data / f"{idx:03d}_metadata.yaml").write_text(f"anomalous: {int(anomalous)}\n")

    for i in range(n_train):
        item("train", i, False)
    item("val", 0, False)
    for i in range(n_good_test + n_defect):
        item("test_public", i, anomalous=i >= n_good_test)
    return root


def make_visa_folder(
    root: str | Path, categories: tuple[str, ...] = ("candle", "pcb1"), n_train: int = 6, n_good_test: int = 2,
    n_defect: int = 2, size: int = 48,
) -> Path:
    """Write a tiny VisA layout: <cat>/Data/Images/{Normal,Anomaly}/*.JPG, masks
    <cat>/Data/Masks/Anomaly/*.png with values 0/1 (as some VisA masks have), and
    split_csv/1cls.csv listing them; return root."""
    root = Path(root)
    rng = np.random.default_rng(4)
    rows = []
    for cat in categories:
        for i in range(n_train + n_good_test):
            rel = f"{cat}/Data/Images/Normal/{i:04d}.JPG"
            Image.fromarray(texture(rng, size)).save(_mk(root / rel), format="JPEG", quality=95)
            rows.append([cat, "train" if i < n_train else "test", "normal", rel, ""])
        for i in range(n_defect):
            rel, mrel = f"{cat}/Data/Images/Anomaly/{i:03d}.JPG", f"{cat}/Data/Masks/Anomaly/{i:03d}.png"
            img, mask = defective(rng, size)
            Image.fromarray(img).save(_mk(root / rel), format="JPEG", quality=95)
            save((mask > 0).astype(np.uint8), root / mrel)
            rows.append([cat, "test", "anomaly", rel, mrel])
    with _mk(root / "split_csv" / "1cls.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)
    return root


def make_user_folder(
    root: str | Path, category: str = "parts", n_good: int = 10, defects: dict[str, int] | None = None,
    masked: tuple[str, ...] = ("crack",), mask_suffix: str = "", n_test_good: int = 0, size: int = 48,
) -> Path:
    """Write a tiny ``folder``-layout category: <category>/good/, one folder per defect type in
    ``defects`` (name -> count), masks under masks/<defect>/<stem><mask_suffix>.png for the
    types in ``masked``, and n_test_good images in test/good/ when > 0; return root."""
    root = Path(root)
    rng = np.random.default_rng(5)
    cat = root / category
    for i in range(n_good):
        save(texture(rng, size), cat / "good" / f"g{i:03d}.png")
    for i in range(n_test_good):
        save(texture(rng, size), cat / "test" / "good" / f"t{i:03d}.png")
    for kind, count in (defects if defects is not None else {"crack": 2, "spot": 2}).items():
        for i in range(count):
            img, mask = defective(rng, size)
            save(img, cat / kind / f"{kind}{i:02d}.png")
            if kind in masked:
                save(mask, cat / "masks" / kind / f"{kind}{i:02d}{mask_suffix}.png")
    return root


def _mk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def tiny_run_args(data_root: str | Path, out: str | Path, *extra: str, size: int = 64, epochs: int = 1,
                  pictures: bool = False) -> list[str]:
    """Script arguments for a tiny CPU run on category "widget": random resnet18 teacher, 1/4 held out.

    ``extra`` overrides come last, so they win. Pictures are off unless asked for: they cost time and
    most tests are not about them.
    """
    return ["data.dataset=mvtec", f"data.root={data_root}", "data.category=widget", f"data.image_size={size}",
            "data.num_workers=0", "data.val_fraction=0.25", "model.backbone=resnet18", "model.pretrained=false",
            f"train.epochs={epochs}", "train.batch_size=4", "eval.batch_size=4", "memory.exemplars=2",
            "train.device=cpu", f"output.dir={out}", *([] if pictures else ["eval.max_pictures=0"]), *extra]
