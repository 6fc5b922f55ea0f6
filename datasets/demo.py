"""The built-in demo dataset: real texture photographs with synthetic defects and exact masks.

``ensure_demo_dataset(root)`` writes, once, an MVTec-layout dataset built from the
photographs scikit-image ships (``skimage.data.brick/gravel/grass``, 512x512 grayscale),
tinted to RGB. Each category has N_TRAIN train images and N_TEST_GOOD good test images
(random CROP x CROP windows with flips and a slight brightness jitter, resized to SIZE x SIZE)
and N_PER_DEFECT test images for each of four defect types:

- foreign: a patch of another category's texture pasted into an irregular blob;
- scratch: a thin bright curve;
- stain: a blob whose colour is pulled towards brown, strongest at its centre;
- hole: a dark irregular blob.

Each defect changes pixels only inside its mask, and its mask covers 1.2-7 % of the image.
Everything is drawn from fixed seeds, so regenerating gives byte-identical files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import data as skdata
from skimage import draw

from utils.errors import UserError

DEMO_VERSION = 1
DEMO_CATEGORIES: tuple[str, ...] = ("brick", "gravel", "grass")
DEFECT_TYPES: tuple[str, ...] = ("foreign", "scratch", "stain", "hole")
N_TRAIN, N_TEST_GOOD, N_PER_DEFECT = 48, 12, 4
CROP, SIZE = 160, 128
SEED = 20230917
MARKER = ".complete"
MIN_AREA, MAX_AREA = 0.012, 0.07

# Per-channel gain and offset turning each grayscale photograph into a plausible colour.
_TINTS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "brick": ((0.95, 0.62, 0.50), (20.0, 10.0, 8.0)),
    "gravel": ((0.85, 0.83, 0.78), (18.0, 18.0, 20.0)),
    "grass": ((0.55, 0.85, 0.40), (10.0, 25.0, 5.0)),
}


def _marker_text() -> str:
    return f"memkd-demo {DEMO_VERSION}\n"


def is_complete(root: Path) -> bool:
    """True when ``root`` holds a finished demo of the current version."""
    marker = Path(root) / MARKER
    return marker.is_file() and marker.read_text() == _marker_text()


def texture(category: str) -> np.ndarray:
    """The tinted source photograph of ``category``: 512x512x3 float64 in [0, 255]."""
    grey = getattr(skdata, category)().astype(np.float64)
    gain, offset = _TINTS[category]
    return np.clip(grey[..., None] * np.array(gain) + np.array(offset), 0, 255)


def random_view(src: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random CROP window of ``src`` with random flips and brightness, resized to SIZE; uint8."""
    y, x = rng.integers(0, src.shape[0] - CROP + 1), rng.integers(0, src.shape[1] - CROP + 1)
    patch = src[y : y + CROP, x : x + CROP]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    if rng.random() < 0.5:
        patch = patch[::-1, :]
    patch = np.clip(patch * rng.uniform(0.93, 1.07), 0, 255)
    img = Image.fromarray(np.rint(patch).astype(np.uint8), mode="RGB")
    return np.asarray(img.resize((SIZE, SIZE), Image.Resampling.BILINEAR))


def _area_ok(mask: np.ndarray) -> bool:
    return MIN_AREA <= mask.mean() <= MAX_AREA


def blob_region(rng: np.random.Generator) -> np.ndarray:
    """An irregular blob (union of 3-5 rotated ellipses) covering MIN_AREA..MAX_AREA; bool SIZE x SIZE."""
    while True:
        mask = np.zeros((SIZE, SIZE), dtype=bool)
        radius = rng.uniform(8, 16)
        cy, cx = rng.uniform(radius + 6, SIZE - radius - 6, size=2)
        for _ in range(rng.integers(3, 6)):
            dy, dx = rng.normal(0, radius / 2.5, size=2)
            ry, rx = radius * rng.uniform(0.45, 0.95, size=2)
            rr, cc = draw.ellipse(cy + dy, cx + dx, ry, rx, shape=mask.shape, rotation=rng.uniform(0, np.pi))
            mask[rr, cc] = True
        if _area_ok(mask):
            return mask


def scratch_region(rng: np.random.Generator) -> np.ndarray:
    """A thin curved line (quadratic Bezier, 2-3 px wide) covering MIN_AREA..MAX_AREA; bool SIZE x SIZE."""
    while True:
        mask = np.zeros((SIZE, SIZE), dtype=bool)
        p0 = rng.uniform(12, SIZE - 12, size=2)
        angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(55, 95)
        p2 = np.clip(p0 + length * np.array([np.sin(angle), np.cos(angle)]), 4, SIZE - 5)
        p1 = (p0 + p2) / 2 + rng.normal(0, 12, size=2)
        t = np.linspace(0, 1, 400)[:, None]
        pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        rr, cc = np.clip(np.rint(pts).astype(int), 0, SIZE - 1).T
        mask[rr, cc] = True
        mask = ndimage.binary_dilation(mask, iterations=int(rng.integers(1, 3)))
        if _area_ok(mask):
            return mask


def make_defect(kind: str, clean: np.ndarray, rng: np.random.Generator, foreign: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply defect ``kind`` to the uint8 image ``clean``; return (defective uint8 image, bool mask).

    ``foreign`` is a same-size uint8 view of another texture, used by the "foreign" kind.
    Pixels outside the mask are left untouched, so the mask covers every changed pixel.
    """
    img = clean.astype(np.float64)
    if kind == "scratch":
        mask = scratch_region(rng)
        colour = np.array([235.0, 230.0, 220.0]) * rng.uniform(0.9, 1.0)
        new = 0.2 * img + 0.8 * colour
    else:
        mask = blob_region(rng)
        if kind == "foreign":
            new = foreign.astype(np.float64)
        elif kind == "stain":
            # Strongest at the centre, fading towards the edge but still visible there.
            weight = ndimage.gaussian_filter(mask.astype(np.float64), sigma=3.0)
            weight = np.clip(weight / max(weight.max(), 1e-9), 0.4, 1.0)[..., None]
            new = img * (1 - 0.75 * weight) + np.array([90.0, 55.0, 25.0]) * 0.75 * weight
        elif kind == "hole":
            new = img * 0.12 + 6.0
        else:
            raise ValueError(f"unknown defect kind {kind!r}; expected one of {DEFECT_TYPES}")
    out = np.where(mask[..., None], np.clip(np.rint(new), 0, 255), img)
    return out.astype(np.uint8), mask


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", compress_level=1)  # fast; still deterministic


def _write_category(out: Path, index: int, category: str) -> None:
    rng = np.random.default_rng([SEED, index])
    src = texture(category)
    other = texture(DEMO_CATEGORIES[(index + 1) % len(DEMO_CATEGORIES)])
    cat = out / category
    for i in range(N_TRAIN):
        _save(random_view(src, rng), cat / "train" / "good" / f"{i:03d}.png")
    for i in range(N_TEST_GOOD):
        _save(random_view(src, rng), cat / "test" / "good" / f"{i:03d}.png")
    for kind in DEFECT_TYPES:
        for i in range(N_PER_DEFECT):
            image, mask = make_defect(kind, random_view(src, rng), rng, random_view(other, rng))
            _save(image, cat / "test" / kind / f"{i:03d}.png")
            _save(mask.astype(np.uint8) * 255, cat / "ground_truth" / kind / f"{i:03d}_mask.png")


def generate(out: Path) -> None:
    """Write the whole demo into the (new or empty) folder ``out``, the marker file last."""
    out.mkdir(parents=True, exist_ok=True)
    for index, category in enumerate(DEMO_CATEGORIES):
        _write_category(out, index, category)
    (out / MARKER).write_text(_marker_text())


def ensure_demo_dataset(root: str | Path) -> Path:
    """Make sure ``root`` holds the complete demo dataset (generating it if needed); return ``root``.

    Generation goes to a temporary sibling folder that is renamed to ``root`` only when
    finished, so an interrupted run is never mistaken for a complete dataset. A demo of an
    older version is replaced; any other non-empty ``root`` is left alone (UserError).
    """
    root = Path(root).expanduser()
    if is_complete(root):
        return root
    if root.exists():
        if not root.is_dir():
            raise UserError(f"demo data.root {root} is a file; point data.root at a folder")
        entries = {p.name for p in root.iterdir()}
        if (root / MARKER).is_file() and entries <= set(DEMO_CATEGORIES) | {MARKER}:
            shutil.rmtree(root)  # an older demo version: ours to replace
        elif entries:
            raise UserError(
                f"demo data.root {root} is not empty and holds no demo dataset; point data.root at a new or empty folder"
            )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        generate(tmp)
        if root.is_dir():
            root.rmdir()  # empty, checked above
        os.rename(tmp, root)
    except OSError as exc:
        if not is_complete(root):  # another process may have finished first; otherwise a real failure
            raise UserError(f"cannot write the demo dataset to {root} ({exc}); choose a writable data.root") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
