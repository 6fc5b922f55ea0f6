"""Inference: score new images with a trained run (its checkpoint, or its ONNX export): a heatmap
overlay and a binary mask per image, and scores.csv. predict.py runs :func:`main`.

    python predict.py checkpoint=results/memkd-st/demo/brick/best.pt input=path/to/image_or_folder \
        [output=folder] [threshold=normal|f1] [train.device=cpu] [eval.batch_size=8] [--debug]

The run is rebuilt from its checkpoint alone: method and resolved config come from it, the teacher
is resolved as in training and checked against the checkpoint's fingerprint, and the thresholds
stored after evaluation decide (see engine/thresholds.py). A folder is searched recursively; outputs
mirror its sub-folders and keep each image's original size and aspect ratio.
"""
from __future__ import annotations

import csv
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    import torch

    from models.memkd import MemKD
    from engine.onnx_backend import OnnxScorer

from engine.config import METHODS, SCHEMA, Key, RunSettings, check_value, load_config, parse_override
from engine.thresholds import IMAGE_THRESHOLD_CHOICES
from engine.inputs import check_no_input_overwritten, find_images, output_files, output_stems
from utils.errors import UserError, run_command

# Everything heavy (torch, the models) is imported inside the functions, so that --help and
# argument errors answer at once, as the training scripts do.

USAGE = """usage: python predict.py checkpoint=RUN/best.pt input=IMAGE_OR_FOLDER [output=FOLDER] [threshold=normal|f1]
                          [train.device=auto|cpu|cuda] [eval.batch_size=N] [--debug]
       python predict.py backend=onnx model=FILE.onnx input=IMAGE_OR_FOLDER [output=...] [threshold=...] [eval.batch_size=N]

  checkpoint  best.pt of a finished run (it holds the method, the config and the thresholds)
  input       one image, or a folder searched recursively for images
  output      where overlays, masks and scores.csv go (default: predictions/ beside the checkpoint)
  threshold   normal (default): 0.99 quantile of held-out normal training images, needs no test labels;
              f1: the F1-max threshold on the test set, as papers report
Writes <name>_overlay.png and <name>_mask.png at each image's size: the mask marks pixels at or above the
pixel F1-max threshold in images decided anomalous (it is empty for images decided normal).
The output folder may lie inside the input folder (it is then left out of the search) but not be it;
files named *_overlay.png or *_mask.png are taken for earlier outputs and not scored.
With backend=onnx model=FILE.onnx (a graph written by export.py, its JSON beside it) onnxruntime scores
on the CPU instead, with the thresholds and input size of that JSON: no checkpoint, no torchvision weights."""
BACKENDS = ("torch", "onnx")
# predict.py's own arguments, read by the project's one key=value parser (engine/config.py).
OPTIONS: dict[str, Key] = {
    "checkpoint": Key(str, "best.pt of a finished run", path=True),
    "input": Key(str, "an image or a folder of images", path=True),
    "output": Key(str, "folder for overlays, masks and scores.csv", path=True),
    "threshold": Key(str, "image threshold", choices=tuple(IMAGE_THRESHOLD_CHOICES)),
    "backend": Key(str, "what scores", choices=BACKENDS),
    "model": Key(str, "an .onnx graph written by export.py (backend=onnx)", path=True),
}
CONFIG_OVERRIDES = ("train.device", "eval.batch_size")  # where and how fast: they cannot change a score
SCORES_FILE = "scores.csv"
# Source pixels decoded and held at once: a batch ends before it would pass this many (an image
# larger than this is a batch of its own). 32 Mpx are 128 MiB as Pillow RGB; with eval.batch_size,
# this bounds memory whatever the sizes of the input images.
BATCH_PIXELS = 1 << 25


@dataclass(frozen=True)
class PredictOptions:
    """What predict.py was asked: the model file (a checkpoint, or an ONNX graph with
    ``backend=onnx``), the input, the output folder (None: beside the model), the threshold, and
    the config overrides that move the run (``train.device``, ``eval.batch_size``)."""

    model: Path
    input: Path
    output: Path | None
    threshold: str = "normal"
    backend: str = "torch"
    overrides: dict[str, Any] = field(default_factory=dict)


def parse_args(argv: Sequence[str]) -> PredictOptions:
    """predict.py's ``key=value`` arguments; UserError on anything else."""
    schema = {**OPTIONS, **{key: SCHEMA[key] for key in CONFIG_OVERRIDES}}
    given: dict[str, Any] = {}
    for arg in argv:
        key, value = parse_override(arg, schema)
        if value in (None, ""):
            raise UserError(f"cannot read argument '{arg}'; write key=value, e.g. input=photos/")
        given[key] = check_value(key, value, schema)
    backend = given.get("backend", "torch")
    # Each backend reads one model file; the other's option would be silently unused, so it is refused.
    if backend == "onnx" and "checkpoint" in given:
        raise UserError("checkpoint= is not read with backend=onnx (the graph holds the model); give model=FILE.onnx only")
    if backend == "torch" and "model" in given:
        raise UserError("model= is read with backend=onnx only; add backend=onnx, or give checkpoint=RUN/best.pt instead")
    model_key, example = (("model", "model=results/memkd-st/demo/brick/best.onnx") if backend == "onnx"
                          else ("checkpoint", "checkpoint=results/memkd-st/demo/brick/best.pt"))
    missing = [key for key in (model_key, "input") if key not in given]
    if missing:
        raise UserError(f"give {' and '.join(f'{k}=...' for k in missing)}, e.g. {example} input=photos/")
    output = given.get("output")
    return PredictOptions(Path(given[model_key]), Path(given["input"]), Path(output) if output else None,
                          given.get("threshold", "normal"), backend,
                          {key: given[key] for key in CONFIG_OVERRIDES if key in given})


def pixel_batches(sizes: Sequence[tuple[int, int]], max_images: int, max_pixels: int) -> list[list[int]]:
    """Consecutive image indices grouped into batches of at most ``max_images`` images and
    ``max_pixels`` pixels in all (``sizes`` are (width, height)); an image larger than
    ``max_pixels`` is a batch of its own."""
    batches: list[list[int]] = []
    current: list[int] = []
    pixels = 0
    for index, (width, height) in enumerate(sizes):
        if current and (len(current) == max_images or pixels + width * height > max_pixels):
            batches.append(current)
            current, pixels = [], 0
        current.append(index)
        pixels += width * height
    if current:
        batches.append(current)
    return batches


def check_finite(maps: torch.Tensor, paths: Sequence[Path], checkpoint: Path) -> None:
    """UserError naming the first image whose anomaly map holds NaN or inf: no decision can be made for it.

    NaN compares False with every threshold, so unchecked it would be decided "normal".
    """
    import torch

    finite = torch.isfinite(maps).flatten(1).all(1)
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0])
        raise UserError(f"the anomaly map of {paths[bad]} is not finite (NaN or inf), so it cannot be decided; "
                        f"the model of {checkpoint} overflows or holds NaN weights: retrain it (e.g. with a lower "
                        "train.lr) or give another checkpoint")


def load_run(checkpoint: Path, overrides: Mapping[str, Any]
             ) -> tuple[MemKD, RunSettings, dict[str, float | None], torch.device]:
    """``(model in eval mode, settings, thresholds, device)`` rebuilt from a best.pt and the
    evaluation.json beside it (its scoring settings and thresholds); ``overrides`` may only move
    the run (:data:`CONFIG_OVERRIDES`).

    UserError when the checkpoint is missing, unreadable, damaged, never evaluated, or does not
    fit the teacher this machine resolves (e.g. other ImageNet weights).
    """
    from engine.checkpoint import check_fits, load_checkpoint, load_student
    from engine.model import build_run_model
    from engine.thresholds import read_evaluation
    from utils.device import select_device

    state = load_checkpoint(checkpoint)
    method = state.get("method")
    if method not in METHODS or not isinstance(state.get("config"), dict):
        raise UserError(f"checkpoint {checkpoint} names no method and config of this code; give a best.pt of a run")
    scoring, thresholds = read_evaluation(checkpoint, state)
    trained = {k: v for k, v in state["config"].items() if k in SCHEMA}
    try:
        # The model as trained, scored as evaluated; the overrides only move the run. Keys a
        # checkpoint of an older version lacks take config.yaml's values.
        settings = RunSettings.from_flat(method, {**load_config(method).flat(), **trained, **scoring, **overrides})
    except UserError as e:
        raise UserError(f"checkpoint {checkpoint}: {e}") from None
    device = select_device(settings.train.device)
    model = build_run_model(settings).to(device)
    check_fits(state, checkpoint, settings, model.teacher_fingerprint)
    load_student(model, state, checkpoint)
    return model.eval(), settings, thresholds, device


def load_onnx_run(model_path: Path, overrides: Mapping[str, Any]
                  ) -> tuple[OnnxScorer, RunSettings, dict[str, float | None], torch.device]:
    """``(scorer, settings, thresholds, device)`` as :func:`load_run` gives them, from a graph written
    by export.py and the JSON beside it; onnxruntime scores on the CPU, at the JSON's input size.

    UserError when either file is missing or unreadable, or ``train.device=cuda`` is asked for.
    """
    import torch

    from engine.onnx_backend import OnnxScorer

    scorer = OnnxScorer(model_path)
    if scorer.method not in METHODS:
        raise UserError(f"{model_path}'s JSON names method {scorer.method!r}, not one of {', '.join(METHODS)}; "
                        "export the run again with export.py")
    settings = load_config(scorer.method).replace({**overrides, "data.image_size": scorer.image_size})
    if settings.train.device == "cuda":
        raise UserError("backend=onnx scores on the CPU with onnxruntime; drop train.device=cuda, or use backend=torch")
    return scorer, settings, scorer.thresholds, torch.device("cpu")


def _write_png(path: Path, picture: Any) -> None:
    from utils.io import atomic_write

    atomic_write(path, lambda f: picture.save(f, format="PNG"))


def predict(options: PredictOptions) -> Path:
    """Score every input image, write overlays, masks and scores.csv; return the output folder.

    Images are scored at the model's input size, in batches of at most ``eval.batch_size`` images
    and :data:`BATCH_PIXELS` source pixels, and each overlay and mask is drawn tile by tile at the
    image's own size, so that memory stays bounded whatever the sizes of the images. scores.csv is
    written last; a run that fails part-way leaves none (an earlier one is removed at the start).
    """
    import torch

    from datasets.images import image_to_tensor, load_rgb
    from models.anomaly_map import image_scores
    from utils.io import write_text
    from engine.thresholds import image_threshold, mask_threshold
    from engine.pictures import overlay_and_mask

    # With backend=onnx the exported graph stands where the checkpoint would: default output, messages.
    checkpoint, source = options.model, options.input
    output = options.output or checkpoint.parent / "predictions"
    found = find_images(source, output)
    stems = output_stems(found.paths, source)
    check_no_input_overwritten(found.paths, stems, output)
    load = load_onnx_run if options.backend == "onnx" else load_run
    model, settings, thresholds, device = load(checkpoint, options.overrides)
    decide = image_threshold(thresholds, options.threshold, checkpoint)
    pixel = mask_threshold(thresholds, decide)
    low = thresholds["map_low"] if thresholds["map_low"] is not None else 0.0
    try:
        output.mkdir(parents=True, exist_ok=True)
        (output / SCORES_FILE).unlink(missing_ok=True)  # it must never list the outputs of another run
    except OSError as e:
        raise UserError(f"cannot create output folder {output} ({e.strerror}); give a writable output=") from None
    for note in found.notes:
        print(f"note: {note}", file=sys.stderr)

    rows = []
    with torch.no_grad():
        for batch in pixel_batches(found.sizes, settings.eval.batch_size, BATCH_PIXELS):
            paths = [found.paths[i] for i in batch]
            pictures = [load_rgb(path) for path in paths]
            inputs = torch.stack([image_to_tensor(p, settings.data.image_size) for p in pictures]).to(device)
            maps = model.anomaly_map(inputs).float().cpu()
            check_finite(maps, paths, checkpoint)
            for i, picture, amap, score in zip(batch, pictures, maps, image_scores(maps).tolist()):
                anomalous = score >= decide
                # An image decided normal gets an empty mask, so that the mask never contradicts the decision.
                overlay, mask = overlay_and_mask(picture, amap.numpy(), low, pixel, draw_mask=anomalous)
                overlay_path, mask_path = output_files(output, stems[i])
                _write_png(overlay_path, overlay)
                _write_png(mask_path, mask)
                rows.append((str(found.paths[i]), f"{score:.6g}", f"{decide:.6g}",
                             "anomalous" if anomalous else "normal",
                             overlay_path.relative_to(output).as_posix(), mask_path.relative_to(output).as_posix()))
            del pictures, inputs, maps  # before the next batch is decoded

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("path", "score", "threshold", "decision", "overlay", "mask"))
    writer.writerows(rows)
    write_text(output / SCORES_FILE, buffer.getvalue())
    flagged = sum(row[3] == "anomalous" for row in rows)
    print(f"{len(rows)} images scored, {flagged} anomalous (threshold={options.threshold}: {decide:.6g}; "
          f"masks at {pixel:.6g})")
    return output


def main(argv: Sequence[str]) -> int:
    """Run predict.py; a UserError becomes one line on stderr and exit code 2 (``--debug``: traceback)."""
    return run_command(argv, USAGE, lambda args: f"predictions: {predict(parse_args(args))}")
