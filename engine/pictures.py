"""Pictures of a run: heatmap overlays, binary masks, the examples grid, the ROC curves and the
training curves (curves.png, from history.json's records).

Drawing uses matplotlib's Agg canvas directly (no pyplot, so no global backend state and no
window), at screen resolution. matplotlib is imported inside the drawing functions so that
importing this module, as the engine does, costs nothing when pictures are disabled.

Heatmap colours are on one fixed scale per model, never per image (a per-image min-max stretch
would paint every normal image hot): ``low`` (the lowest test-map value) is blue, the mask
threshold is the middle of the colour map, and anything at or above ``2 * threshold - low`` is red.
So warm colours mean "above the threshold", the same in examples.png and in predict.py's output.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from datasets.images import IMAGENET_MEAN, IMAGENET_STD
from utils.errors import UserError
from utils.io import atomic_write
from utils.metrics import is_finite_number

DPI = 100
CELL_PIXELS = 200  # side of one picture of the examples grid, in screen pixels
GAP_PIXELS = 4  # white space between the pictures of the grid
COLOUR_MAP = "jet"
OVERLAY_ALPHA = 0.5  # share of the heatmap in an overlay
ROC_PIXEL_SAMPLE = 200_000  # pixels drawn in the pixel ROC curve (the AUROC itself uses every pixel)
ROC_CURVE_POINTS = 2_000  # at most this many points per drawn curve
PICTURES = ("examples.png", "roc.png")
OUTLINE_COLOUR = (0, 255, 0)  # ground-truth outlines
# Pixels of a full-size overlay or mask drawn at once (its float working arrays, ~80 bytes a pixel,
# then take ~20 MiB), so that a picture of any size is drawn in bounded memory.
TILE_PIXELS = 1 << 18


# --------------------------------------------------------------------------- colours and masks


def heat_levels(maps: np.ndarray, low: float, threshold: float) -> np.ndarray:
    """Anomaly-map values mapped to [0, 1]: ``low`` -> 0, ``threshold`` -> 0.5, clipped at 1."""
    span = max(threshold - low, 1e-12)
    return np.clip((np.asarray(maps, dtype=np.float32) - low) / (2 * span), 0.0, 1.0)


def heatmap_overlay(rgb: np.ndarray, amap: np.ndarray, low: float, threshold: float) -> np.ndarray:
    """An HxWx3 uint8 picture: ``rgb`` (HxWx3 uint8) blended with the colour-mapped ``amap`` (HxW)."""
    import matplotlib

    colours = matplotlib.colormaps[COLOUR_MAP](heat_levels(amap, low, threshold))[..., :3]
    blended = (1 - OVERLAY_ALPHA) * (rgb.astype(np.float32) / 255.0) + OVERLAY_ALPHA * colours
    return np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8)


def binary_mask(amap: np.ndarray, threshold: float) -> np.ndarray:
    """HxW uint8: 255 where ``amap >= threshold`` (anomalous), 0 elsewhere."""
    return np.where(np.asarray(amap) >= threshold, 255, 0).astype(np.uint8)


def _bilinear_sources(out_size: int, in_size: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For output pixels ``start..stop-1`` of a bilinear resize from ``in_size`` to ``out_size``: the
    two source indices and the weight of the second, by torch's rule (``align_corners=False``)."""
    position = (np.arange(start, stop, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
    position = np.maximum(position, 0.0)
    low = np.minimum(np.floor(position).astype(np.int64), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    return low, high, (position - low).astype(np.float32)


def resize_map_region(amap: np.ndarray, height: int, width: int, rows: tuple[int, int],
                      cols: tuple[int, int]) -> np.ndarray:
    """Rows ``rows[0]:rows[1]`` and columns ``cols[0]:cols[1]`` of ``amap`` [h, w] resized (bilinear,
    as ``torch.nn.functional.interpolate(..., align_corners=False)``) to ``height`` x ``width``.

    Float32, of the region's shape only: a map can be brought to a picture of any size one
    bounded region at a time, never as a whole.
    """
    amap = np.asarray(amap, dtype=np.float32)
    top, bottom, weight_y = _bilinear_sources(height, amap.shape[0], *rows)
    left, right, weight_x = _bilinear_sources(width, amap.shape[1], *cols)
    upper, lower = amap[top], amap[bottom]  # [region rows, w]
    band = upper + (lower - upper) * weight_y[:, None]
    return band[:, left] + (band[:, right] - band[:, left]) * weight_x[None, :]


def tiles(height: int, width: int, pixels: int) -> Iterator[tuple[tuple[int, int], tuple[int, int]]]:
    """``(rows, cols)`` ranges covering a ``height`` x ``width`` picture, each of at most ``pixels`` pixels."""
    tile_width = max(1, min(width, pixels))
    tile_height = max(1, pixels // tile_width)
    for top in range(0, height, tile_height):
        for left in range(0, width, tile_width):
            yield (top, min(top + tile_height, height)), (left, min(left + tile_width, width))


def overlay_and_mask(picture: Any, amap: np.ndarray, low: float, threshold: float, draw_mask: bool,
                     tile_pixels: int = TILE_PIXELS) -> tuple[Any, Any]:
    """The heatmap overlay (RGB) and the binary mask (L, 255 where the map >= ``threshold``; empty
    unless ``draw_mask``) of an RGB PIL ``picture``, with ``amap`` [h, w] resized to its size.

    Drawn one tile of at most ``tile_pixels`` pixels at a time: besides the two 8-bit pictures
    returned (4 + 1 bytes per pixel), the working memory does not grow with the picture.
    """
    from PIL import Image

    width, height = picture.size
    overlay = Image.new("RGB", (width, height))
    mask = Image.new("L", (width, height), 0)
    for rows, cols in tiles(height, width, tile_pixels):
        region = resize_map_region(amap, height, width, rows, cols)
        rgb = np.asarray(picture.crop((cols[0], rows[0], cols[1], rows[1])))
        overlay.paste(Image.fromarray(heatmap_overlay(rgb, region, low, threshold)), (cols[0], rows[0]))
        if draw_mask:
            mask.paste(Image.fromarray(binary_mask(region, threshold)), (cols[0], rows[0]))
    return overlay, mask


def display_threshold(thresholds: dict[str, float | None], maps: np.ndarray) -> float:
    """The pixel threshold pictures are drawn with: pixel F1-max, else image F1-max, else normal, else the maximum."""
    for key in ("pixel_f1_threshold", "image_f1_threshold", "normal_threshold"):
        if thresholds.get(key) is not None:
            return float(thresholds[key])
    return float(maps.max())


def _denormalise(image: torch.Tensor) -> np.ndarray:
    """A 3xHxW ImageNet-normalised tensor back to HxWx3 uint8."""
    rgb = image.float().cpu().numpy().transpose(1, 2, 0) * np.float32(IMAGENET_STD) + np.float32(IMAGENET_MEAN)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def save_figure(fig: Any, path: Path) -> Path:
    """Render ``fig`` with Agg and write it atomically as an RGB PNG.

    Not ``savefig``: it writes RGBA at zlib level 6, about 5x slower to encode for a grid of photographs
    (measured 0.88 s against 0.16 s for six rows), for a file only 20 % smaller.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3]  # the figure is opaque: alpha carries nothing
    return atomic_write(path, lambda f: Image.fromarray(rgb).save(f, format="PNG", compress_level=1))


# --------------------------------------------------------------------------- the examples grid


def choose_examples(scores: np.ndarray, labels: np.ndarray, rows: int) -> list[tuple[int, str]]:
    """Up to ``rows`` test images worth looking at, as ``(index, why)``, grouped by why.

    Taken in turn from three lists so that each kind gets about a third of the rows: anomalies
    with the highest scores (found), anomalies with the lowest scores (missed), and normal images
    with the highest scores (false alarms). No image appears twice; a short list leaves its rows
    to the others.
    """
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    anomalies = [int(i) for i in order if labels[i]]
    normals = [int(i) for i in order if not labels[i]]
    groups = (("anomaly, high score", anomalies), ("anomaly, low score", anomalies[::-1]),
              ("normal, high score", normals))
    picked: list[list[int]] = [[] for _ in groups]
    used: set[int] = set()
    cursors = [0] * len(groups)
    progress = True
    while len(used) < rows and progress:
        progress = False
        for g, (_, candidates) in enumerate(groups):
            while cursors[g] < len(candidates) and candidates[cursors[g]] in used:
                cursors[g] += 1
            if len(used) < rows and cursors[g] < len(candidates):
                picked[g].append(candidates[cursors[g]])
                used.add(candidates[cursors[g]])
                progress = True
    return [(i, why) for g, (why, _) in enumerate(groups) for i in picked[g]]


def outline(rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = OUTLINE_COLOUR) -> np.ndarray:
    """A copy of ``rgb`` (HxWx3 uint8) with the border of ``mask`` (HxW bool) painted in ``colour``.

    The border is the mask minus its erosion, thickened to about 1 % of the image side so that it
    stays visible when the picture is shown smaller.
    """
    from scipy import ndimage

    edge = mask & ~ndimage.binary_erosion(mask, border_value=0)
    width = max(1, round(0.01 * max(mask.shape)))
    if width > 1:
        edge = ndimage.binary_dilation(edge, iterations=width - 1) & mask
    painted = rgb.copy()
    painted[edge] = colour
    return painted


def _fit(picture: np.ndarray, side: int) -> np.ndarray:
    """An HxWx3 uint8 picture resized to ``side`` x ``side`` (bilinear, antialiased)."""
    from PIL import Image

    if picture.shape[:2] == (side, side):
        return picture
    return np.asarray(Image.fromarray(picture).resize((side, side), Image.Resampling.BILINEAR))


def _mosaic(cells: Sequence[Sequence[np.ndarray]], gap: int) -> np.ndarray:
    """Rows of equally sized HxWx3 uint8 pictures tiled into one picture with white gaps."""
    h, w = cells[0][0].shape[:2]
    rows, cols = len(cells), len(cells[0])
    canvas = np.full((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, 3), 255, dtype=np.uint8)
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            canvas[r * (h + gap): r * (h + gap) + h, c * (w + gap): c * (w + gap) + w] = cell
    return canvas


def example_cells(rgb: np.ndarray, amap: np.ndarray, mask: np.ndarray | None, low: float,
                  threshold: float) -> list[np.ndarray]:
    """The four pictures of one examples row, HxWx3 uint8 each: input, heatmap overlay, ground-truth
    outline on the input (the input alone when ``mask`` is None), predicted mask with that outline."""
    predicted = np.repeat(binary_mask(amap, threshold)[..., None], 3, axis=2)
    if mask is None:
        return [rgb, heatmap_overlay(rgb, amap, low, threshold), rgb, predicted]
    return [rgb, heatmap_overlay(rgb, amap, low, threshold), outline(rgb, mask), outline(predicted, mask)]


def draw_examples(path: Path, dataset: Sequence[dict[str, Any]], maps: np.ndarray, masks: np.ndarray,
                  has_mask: np.ndarray, scores: np.ndarray, picks: list[tuple[int, str]], low: float,
                  threshold: float) -> Path:
    """Write the examples grid to ``path``: one row per pick, four columns.

    Columns: the input; the heatmap overlay; the ground-truth outline (green) on the input; the
    predicted mask (``maps >= threshold``, white) with the ground-truth outline. ``dataset[i]``
    must give an ImageNet-normalised ``image`` and its ``defect`` name, at the resolution of
    ``maps``. The pictures are tiled into one image shown on one Axes: a Matplotlib Axes per
    picture costs about 0.1 s each to build and draw, which would dominate evaluation.
    """
    from matplotlib.figure import Figure

    rows = []
    for index, _ in picks:
        mask = masks[index] > 0 if has_mask[index] else None
        cells = example_cells(_denormalise(dataset[index]["image"]), maps[index], mask, low, threshold)
        rows.append([_fit(cell, CELL_PIXELS) for cell in cells])
    gap = GAP_PIXELS
    mosaic = _mosaic(rows, gap)
    # The Axes is exactly as many screen pixels as the mosaic, so it is shown 1:1, not resampled.
    left, top, margin = 140, 30, 5  # pixels for the row labels, the column titles, the other borders
    height, width = mosaic.shape[:2]
    fig_w, fig_h = left + width + margin, top + height + margin
    fig = Figure(figsize=(fig_w / DPI, fig_h / DPI), dpi=DPI)
    ax = fig.add_axes((left / fig_w, margin / fig_h, width / fig_w, height / fig_h))
    ax.imshow(mosaic, interpolation="none")
    ax.set_axis_off()
    cell_h = cell_w = CELL_PIXELS + gap
    titles = ("input", "anomaly map", "ground truth", f"mask (map \u2265 {threshold:.3g})")
    for col, title in enumerate(titles):
        ax.text((col + 0.5) * cell_w, -gap, title, ha="center", va="bottom", fontsize=9)
    for row, (index, why) in enumerate(picks):
        label = f"{why}\n{dataset[index]['defect']}\nscore {scores[index]:.3g}"
        if not has_mask[index]:
            label += "\n(no mask)"
        ax.text(-2 * gap, (row + 0.5) * cell_h, label, ha="right", va="center", fontsize=8)
    return save_figure(fig, path)


# --------------------------------------------------------------------------- ROC curves


def roc_points(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ROC curve ``(fpr, tpr)`` from (0, 0) to (1, 1), one point per distinct score.

    ``labels`` must hold both classes. Tied scores make one point, as in ``utils.metrics.auroc``.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    ends = np.flatnonzero(np.append(sorted_scores[1:] != sorted_scores[:-1], True))
    tps = np.cumsum(sorted_labels)[ends]
    fps = ends + 1 - tps
    return np.concatenate(([0.0], fps / fps[-1])), np.concatenate(([0.0], tps / tps[-1]))


def _thin(fpr: np.ndarray, tpr: np.ndarray, points: int = ROC_CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most ``points`` evenly spaced points of a curve, keeping both ends (drawing speed only)."""
    if fpr.size <= points:
        return fpr, tpr
    keep = np.unique(np.linspace(0, fpr.size - 1, points).round().astype(np.int64))
    return fpr[keep], tpr[keep]


def sample_pixels(maps: np.ndarray, masks: np.ndarray, keep: np.ndarray, count: int,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, labels)`` of ``count`` pixels drawn at random, with replacement, from the images
    [N, H, W] where ``keep`` [N] is True; every such pixel when there are no more than ``count``."""
    kept = np.flatnonzero(keep)
    flat_maps, flat_masks = maps.reshape(len(maps), -1), masks.reshape(len(masks), -1)
    per_image = flat_maps.shape[1]
    if kept.size * per_image <= count:
        return flat_maps[kept].ravel(), flat_masks[kept].ravel() > 0
    # Index (image, pixel) pairs directly: copying the kept maps first would cost more than the drawing.
    chosen = np.random.default_rng(seed).integers(0, kept.size * per_image, count)
    images, pixels = kept[chosen // per_image], chosen % per_image
    return flat_maps[images, pixels], flat_masks[images, pixels] > 0


def _roc_panel(ax: Any, scores: np.ndarray, labels: np.ndarray, auroc: float | None, title: str, what: str) -> None:
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=0.8)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate", aspect="equal")
    ax.set_title(title, fontsize=9)
    if labels.size == 0 or labels.all() or not labels.any():
        ax.text(0.5, 0.5, f"undefined: needs normal\nand anomalous {what}", ha="center", va="center", fontsize=9)
        return
    fpr, tpr = _thin(*roc_points(scores, labels))
    label = "AUROC -" if auroc is None or math.isnan(auroc) else f"AUROC {100 * auroc:.1f}%"
    ax.plot(fpr, tpr, linewidth=1.5, label=label)
    ax.legend(loc="lower right", fontsize=9)


def draw_roc(path: Path, scores: np.ndarray, labels: np.ndarray, maps: np.ndarray, masks: np.ndarray,
             has_mask: np.ndarray, image_auroc: float | None, pixel_auroc: float | None,
             pixel_sample: int = ROC_PIXEL_SAMPLE) -> Path:
    """Write image-level and pixel-level ROC curves side by side to ``path``.

    The legends show the AUROC values given (from utils.metrics, on every pixel); the pixel curve
    is drawn from ``pixel_sample`` random pixels of the images that have a ground-truth mask.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4), dpi=DPI)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.12, top=0.92, wspace=0.25)  # fixed: no layout pass
    image_ax, pixel_ax = fig.subplots(1, 2)
    _roc_panel(image_ax, scores, np.asarray(labels).astype(bool), image_auroc, "image level", "images")
    keep = np.asarray(has_mask).astype(bool)
    pixel_scores, pixel_labels = sample_pixels(maps, masks, keep, pixel_sample)
    total = int(keep.sum()) * maps[0].size
    drawn = f"{pixel_scores.size:,} sampled of {total:,} pixels" if pixel_scores.size < total else f"{total:,} pixels"
    _roc_panel(pixel_ax, pixel_scores, pixel_labels, pixel_auroc, f"pixel level ({drawn})", "pixels")
    return save_figure(fig, path)


# --------------------------------------------------------------------------- one run's pictures


def remove_pictures(run_dir: Path) -> None:
    """Delete the pictures of an earlier evaluation, so none outlive the results they showed."""
    for name in PICTURES:
        (run_dir / name).unlink(missing_ok=True)


def save_pictures(run_dir: Path, dataset: Sequence[dict[str, Any]], test: dict[str, torch.Tensor],
                  metrics: dict[str, Any], thresholds: dict[str, float | None], rows: int) -> list[Path]:
    """Write examples.png (``rows`` rows) and roc.png into ``run_dir``; return their paths.

    ``test`` is :func:`engine.run.anomaly_maps`'s result on ``dataset``. ``rows`` 0 draws
    nothing and removes pictures left by an earlier evaluation.
    """
    if rows == 0 or len(dataset) == 0:
        remove_pictures(run_dir)
        return []
    maps = test["maps"].float().numpy()
    masks = test["masks"].numpy()
    labels = test["labels"].numpy().astype(bool)
    has_mask = test["has_mask"].numpy().astype(bool)
    scores = maps.reshape(len(maps), -1).max(axis=1)  # the image score, as models.anomaly_map.image_scores
    low = thresholds.get("map_low")
    low = float(maps.min()) if low is None else low
    threshold = display_threshold(thresholds, maps)
    picks = choose_examples(scores, labels, rows)
    return [
        draw_examples(run_dir / "examples.png", dataset, maps, masks, has_mask, scores, picks, low, threshold),
        draw_roc(run_dir / "roc.png", scores, labels, maps, masks, has_mask, metrics.get("image_auroc"),
                 metrics.get("pixel_auroc")),
    ]


# --------------------------------------------------------------------------- training curves

LOSS_CURVES: tuple[tuple[str, str], ...] = (
    ("loss", "L (total)"), ("kd", "L_KD"), ("nm", "L_NM"), ("orth", "L_Orth"), ("val_kd", "validation L_KD"),
)
ENTROPY_CURVES: tuple[tuple[str, str], ...] = (
    ("recall_entropy", "student queries"), ("exemplar_entropy", "exemplar queries"),
)


def number_or_nan(value: Any) -> float:
    """``value`` as a float, NaN when it is missing or not a finite number (drawn as a gap)."""
    return float(value) if is_finite_number(value) else math.nan


def training_curves_figure(history: Sequence[Mapping[str, Any]], title: str | None = None) -> Any:
    """The matplotlib Figure of :func:`save_training_curves` (exposed so tests can inspect its lines).

    Left panel: every loss term present in ``history`` by epoch, on a log scale when all drawn
    values are positive (the terms differ by orders of magnitude), else linear. Right panel: the
    normalised recall entropy of student and exemplar queries on [0, 1], or a note when the run
    had no memory. Keys absent from every record are left out of the legend.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    records = [r for r in history if isinstance(r, Mapping)]
    if not records:
        raise UserError("the training history is empty: no epoch was trained, so there are no curves to draw; "
                        "train at least one epoch (train.epochs >= 1, phase=train)")
    epochs = [number_or_nan(r.get("epoch", i + 1)) for i, r in enumerate(records)]
    fig = Figure(figsize=(10, 4), dpi=DPI, layout="constrained")
    loss_ax, entropy_ax = fig.subplots(1, 2)

    drawn: list[float] = []
    for key, label in LOSS_CURVES:
        values = [number_or_nan(r.get(key)) for r in records]
        if all(math.isnan(v) for v in values):
            continue
        loss_ax.plot(epochs, values, marker="o", markersize=3, label=label)
        drawn += [v for v in values if not math.isnan(v)]
    if drawn and min(drawn) > 0:
        loss_ax.set_yscale("log")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="losses")
    if drawn:
        loss_ax.legend(fontsize="small")

    has_entropy = False
    for key, label in ENTROPY_CURVES:
        values = [number_or_nan(r.get(key)) for r in records]
        if all(math.isnan(v) for v in values):
            continue
        entropy_ax.plot(epochs, values, marker="o", markersize=3, label=label)
        has_entropy = True
    entropy_ax.set(xlabel="epoch", ylabel="normalised entropy (1 = uniform read)", ylim=(0, 1.02),
                   title="recall entropy of the memory reads")
    if has_entropy:
        entropy_ax.legend(fontsize="small")
    else:
        entropy_ax.text(0.5, 0.5, "no memory in this run:\nno recall entropy", ha="center", va="center",
                        transform=entropy_ax.transAxes, color="grey")
    known_epochs = [e for e in epochs if not math.isnan(e)] or [1.0]
    for ax in (loss_ax, entropy_ax):
        ax.grid(True, alpha=0.3)
        # Integer epochs only, on the same range in both panels: a one-epoch run would otherwise get
        # ticks at 0.96, 0.98, ... and the entropy panel of a baseline run an unrelated 0..1 axis.
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_xlim(min(known_epochs) - 0.5, max(known_epochs) + 0.5)
    if title:
        fig.suptitle(title)
    return fig


def save_training_curves(history: list[dict], path: Path, title: str | None = None) -> Path:
    """Write ``path`` (curves.png) from a run's history.json records and return ``path``.

    Each record is one epoch: ``epoch``, ``loss``, ``kd``, and with memory ``nm``, ``orth``,
    ``recall_entropy``, ``exemplar_entropy``; ``val_kd`` when a validation slice exists. Any of
    them may be missing (a baseline run has no memory terms). The file is replaced atomically;
    an empty history is a UserError and leaves any earlier file untouched.
    """
    return save_figure(training_curves_figure(history, title), Path(path))
