"""Score new images with a trained run: a heatmap overlay and a binary mask per image, and scores.csv.

    python predict.py checkpoint=results/memkd-st/demo/brick/best.pt input=path/to/image_or_folder \
        [output=folder] [threshold=normal|f1] [train.device=cpu] [eval.batch_size=8] [--debug]

The run is rebuilt from its checkpoint alone: method and resolved config come from it, the teacher
is resolved as in training and checked against the checkpoint's fingerprint, and the thresholds
stored after evaluation decide (see utils/thresholds.py). A folder is searched recursively; outputs
mirror its sub-folders and keep each image's original size and aspect ratio.
"""
from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import torch

    from models import MemKD

# Everything heavy (torch, the models) is imported inside the functions, so that --help and
# argument errors answer at once, as the training scripts do.

USAGE = """usage: python predict.py checkpoint=RUN/best.pt input=IMAGE_OR_FOLDER [output=FOLDER] [threshold=normal|f1]
                          [train.device=auto|cpu|cuda] [eval.batch_size=N] [--debug]

  checkpoint  best.pt of a finished run (it holds the method, the config and the thresholds)
  input       one image, or a folder searched recursively for images
  output      where overlays, masks and scores.csv go (default: predictions/ beside the checkpoint)
  threshold   normal (default): 0.99 quantile of held-out normal training images, needs no test labels;
              f1: the F1-max threshold on the test set, as papers report
Writes <name>_overlay.png and <name>_mask.png at each image's size: the mask marks pixels at or above the
pixel F1-max threshold in images decided anomalous (it is empty for images decided normal)."""
OPTIONS = ("checkpoint", "input", "output", "threshold")
CONFIG_OVERRIDES = ("train.device", "eval.batch_size")  # where and how fast: they cannot change a score


def parse_args(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """``(options, config overrides)`` from ``key=value`` arguments; UserError on anything else."""
    from utils.errors import UserError

    options: dict[str, str] = {"threshold": "normal"}
    overrides: list[str] = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or not value:
            raise UserError(f"cannot read argument '{arg}'; write key=value, e.g. input=photos/")
        if key in OPTIONS:
            options[key] = value
        elif key in CONFIG_OVERRIDES:
            overrides.append(arg)
        else:
            raise UserError(f"unknown argument '{key}'; predict.py takes {', '.join(OPTIONS + CONFIG_OVERRIDES)}")
    missing = [key for key in ("checkpoint", "input") if key not in options]
    if missing:
        raise UserError(f"give {' and '.join(f'{k}=...' for k in missing)}, e.g. "
                        "checkpoint=results/memkd-st/demo/brick/best.pt input=photos/")
    return options, overrides


def find_images(source: Path, exclude: Path) -> list[Path]:
    """``source`` itself, or the images below the folder ``source`` (sorted, outside ``exclude``).

    Raises UserError when ``source`` does not exist, is not an image, or holds no image;
    every image's header is checked up front so that a bad file is named before any work starts.
    """
    from datasets.images import IMAGE_EXTENSIONS, check_image_header, is_image_file
    from utils.errors import UserError

    if source.is_file():
        paths = [source]
    elif source.is_dir():
        skip = exclude.resolve()
        paths = sorted(p for p in source.rglob("*") if is_image_file(p) and skip not in p.resolve().parents)
        if not paths:
            raise UserError(f"no images in {source} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}); "
                            "give an image or a folder of images as input=")
    else:
        raise UserError(f"input {source} does not exist; give an image or a folder of images")
    for path in paths:
        check_image_header(path)
    return paths


def output_stems(paths: Sequence[Path], source: Path) -> list[Path]:
    """Output path stem (relative to the output folder) per image: its path below ``source`` without
    suffix; images that differ only by suffix (a.png, a.jpg) keep it in their stem (a_png, a_jpg)."""
    relative = [p.relative_to(source) if source.is_dir() else Path(p.name) for p in paths]
    stems = [r.with_suffix("") for r in relative]
    clashing = {s for s in stems if stems.count(s) > 1}
    return [r.parent / f"{r.stem}_{r.suffix.lstrip('.').lower()}" if s in clashing else s
            for r, s in zip(relative, stems)]


def load_run(checkpoint: Path, overrides: Sequence[str]
             ) -> tuple[MemKD, dict[str, Any], dict[str, float | None], torch.device]:
    """``(model in eval mode, config, thresholds, device)`` rebuilt from a best.pt and the
    evaluation.json beside it (its scoring settings and thresholds).

    UserError when the checkpoint is missing, unreadable, damaged, never evaluated, or does not
    fit the teacher this machine resolves (e.g. other ImageNet weights).
    """
    from models import build_model
    from utils.checkpoint import check_fits, load_checkpoint, load_student
    from utils.config import METHODS, SCHEMA, load_config, validate
    from utils.device import select_device
    from utils.errors import UserError
    from utils.thresholds import read_evaluation

    state = load_checkpoint(checkpoint)
    method = state.get("method")
    if method not in METHODS or not isinstance(state.get("config"), dict):
        raise UserError(f"checkpoint {checkpoint} names no method and config of this code; give a best.pt of a run")
    scoring, thresholds = read_evaluation(checkpoint, state)
    requested = load_config(method, overrides)
    trained = {k: v for k, v in state["config"].items() if k in SCHEMA}
    try:
        # The model as trained, scored as evaluated; the overrides only move the run.
        config = validate({**requested, **trained, **scoring, **{k: requested[k] for k in CONFIG_OVERRIDES}})
    except UserError as e:
        raise UserError(f"checkpoint {checkpoint}: {e}") from None
    device = select_device(config["train.device"])
    model = build_model(method, config).to(device)
    check_fits(state, checkpoint, method, config, model.teacher_fingerprint)
    load_student(model, state, checkpoint)
    return model.eval(), config, thresholds, device


def _write_png(path: Path, array: Any) -> None:
    from PIL import Image

    from utils.io import atomic_write

    atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG"))


def predict(options: dict[str, str], overrides: Sequence[str]) -> Path:
    """Score every input image, write overlays, masks and scores.csv; return the output folder."""
    import numpy as np
    import torch

    from datasets import image_to_tensor, load_rgb
    from models.anomaly_map import image_scores
    from utils.errors import UserError
    from utils.io import write_text
    from utils.thresholds import image_threshold, mask_threshold
    from utils.visualize import binary_mask, heatmap_overlay, resize_map

    checkpoint = Path(options["checkpoint"]).expanduser()
    source = Path(options["input"]).expanduser()
    output = Path(options.get("output") or checkpoint.parent / "predictions").expanduser()
    paths = find_images(source, exclude=output)
    stems = output_stems(paths, source)
    model, config, thresholds, device = load_run(checkpoint, overrides)
    decide = image_threshold(thresholds, options["threshold"], checkpoint)
    pixel = mask_threshold(thresholds, decide)
    low = thresholds["map_low"] if thresholds["map_low"] is not None else 0.0
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {output} ({e.strerror}); give a writable output=") from None

    rows = []
    batch = config["eval.batch_size"]
    with torch.no_grad():
        for start in range(0, len(paths), batch):
            chunk = list(zip(paths[start:start + batch], stems[start:start + batch]))
            pictures = [load_rgb(path) for path, _ in chunk]
            inputs = torch.stack([image_to_tensor(p, config["data.image_size"]) for p in pictures]).to(device)
            maps = model.anomaly_map(inputs).float().cpu()
            for (path, stem), picture, amap, score in zip(chunk, pictures, maps, image_scores(maps).tolist()):
                full = resize_map(amap, picture.height, picture.width)  # back to the image's own size
                anomalous = score >= decide
                # An image decided normal gets an empty mask, so that the mask never contradicts the decision.
                mask = binary_mask(full, pixel) if anomalous else np.zeros(full.shape, np.uint8)
                _write_png(output / f"{stem}_overlay.png", heatmap_overlay(np.asarray(picture), full, low, pixel))
                _write_png(output / f"{stem}_mask.png", mask)
                rows.append((str(path), f"{score:.6g}", f"{decide:.6g}", "anomalous" if anomalous else "normal"))

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("path", "score", "threshold", "decision"))
    writer.writerows(rows)
    write_text(output / "scores.csv", buffer.getvalue())
    flagged = sum(row[3] == "anomalous" for row in rows)
    print(f"{len(rows)} images scored, {flagged} anomalous (threshold={options['threshold']}: {decide:.6g}; "
          f"masks at {pixel:.6g})")
    return output


def main(argv: Sequence[str]) -> int:
    """Run predict.py; a UserError becomes one line on stderr and exit code 2 (``--debug``: traceback)."""
    from utils.errors import UserError

    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        print(USAGE)
        return 0
    debug = "--debug" in argv
    try:
        options, overrides = parse_args([a for a in argv if a != "--debug"])
        output = predict(options, overrides)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"predictions: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
