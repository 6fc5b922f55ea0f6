"""Score new images with a trained run: a heatmap overlay and a binary mask per image, and scores.csv.

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
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import torch

    from models.memkd import MemKD
    from engine.onnx_backend import OnnxScorer

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
OPTIONS = ("checkpoint", "input", "output", "threshold", "backend", "model")
BACKENDS = ("torch", "onnx")
CONFIG_OVERRIDES = ("train.device", "eval.batch_size")  # where and how fast: they cannot change a score
OUTPUT_SUFFIXES = ("_overlay.png", "_mask.png")  # what predict.py writes per image, after its output stem
SCORES_FILE = "scores.csv"
# Source pixels decoded and held at once: a batch ends before it would pass this many (an image
# larger than this is a batch of its own). 32 Mpx are 128 MiB as Pillow RGB; with eval.batch_size,
# this bounds memory whatever the sizes of the input images.
BATCH_PIXELS = 1 << 25


def parse_args(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """``(options, config overrides)`` from ``key=value`` arguments; UserError on anything else."""
    from utils.errors import UserError

    options: dict[str, str] = {"threshold": "normal", "backend": "torch"}
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
    if options["backend"] not in BACKENDS:
        raise UserError(f"backend={options['backend']} is not a choice; use backend=torch (a checkpoint) or "
                        "backend=onnx (a graph written by export.py)")
    # Each backend reads one model file; the other's option would be silently unused, so it is refused.
    if options["backend"] == "onnx" and "checkpoint" in options:
        raise UserError("checkpoint= is not read with backend=onnx (the graph holds the model); give model=FILE.onnx only")
    if options["backend"] == "torch" and "model" in options:
        raise UserError("model= is read with backend=onnx only; add backend=onnx, or give checkpoint=RUN/best.pt instead")
    model_key, example = (("model", "model=results/memkd-st/demo/brick/best.onnx") if options["backend"] == "onnx"
                          else ("checkpoint", "checkpoint=results/memkd-st/demo/brick/best.pt"))
    missing = [key for key in (model_key, "input") if key not in options]
    if missing:
        raise UserError(f"give {' and '.join(f'{k}=...' for k in missing)}, e.g. {example} input=photos/")
    return options, overrides


@dataclass
class InputImages:
    """What the search of ``input=`` found: the images to score, in order, and what it left out."""

    paths: list[Path] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) from each header
    skipped: list[Path] = field(default_factory=list)  # files named like predict.py's outputs
    notes: list[str] = field(default_factory=list)  # folders left out, and why


def is_output_name(name: str) -> bool:
    """True for a file name predict.py writes (``*_overlay.png``, ``*_mask.png``), in any case."""
    return name.lower().endswith(OUTPUT_SUFFIXES)


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def excluded_output(source: Path, output: Path) -> Path | None:
    """The real path of ``output`` when it lies inside the input folder ``source`` (the search then
    leaves it out), else None.

    UserError when ``output`` is ``source`` itself, or lies inside it and already holds images that
    are not predictions: outputs are never mixed with the images they score.
    """
    from datasets.images import IMAGE_EXTENSIONS
    from utils.errors import UserError

    inside, out = _real(source), _real(output)
    if out == inside:
        raise UserError(f"output={output} is the input folder itself; predictions go to a folder of their own, "
                        f"e.g. output={source / 'predictions'} (left out of the search) or a folder outside it")
    if inside not in out.parents:
        return None
    for folder, dirs, files in os.walk(out):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        strays = sorted(f for f in files if Path(f).suffix.lower() in IMAGE_EXTENSIONS
                        and not f.startswith(".") and not is_output_name(f))
        if strays:
            raise UserError(f"output={output} lies inside input={source} and holds images that are not predictions "
                            f"(e.g. {Path(folder) / strays[0]}); give an output= folder without input images, "
                            f"e.g. output={source / 'predictions'}")
    return out


def _search(folder: Path, excluded: Path | None, found: InputImages, visited: dict[Path, Path]) -> None:
    """Add the images below ``folder`` to ``found``, following links, each real folder once."""
    from datasets.images import IMAGE_EXTENSIONS
    from utils.errors import UserError

    real = _real(folder)
    if real == excluded:
        found.notes.append(f"left out the output folder {folder}")
        return
    if real in visited:
        found.notes.append(f"left out {folder}: it is {visited[real]} again, through a link")
        return
    visited[real] = folder
    try:
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
    except OSError as e:
        raise UserError(f"cannot read folder {folder} ({e.strerror or e}); fix its permissions, or move it out "
                        "of the input folder") from None
    for entry in entries:
        if entry.name.startswith("."):
            continue  # hidden files and folders, as in the datasets
        path = folder / entry.name
        if entry.is_symlink() and not path.exists():
            raise UserError(f"{path} is a broken link (to {os.readlink(path)}); remove it, or make it point to "
                            "an image or a folder")
        if entry.is_dir():
            _search(path, excluded, found, visited)
        elif entry.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            (found.skipped if is_output_name(entry.name) else found.paths).append(path)


def find_images(source: Path, output: Path) -> InputImages:
    """The images to score: ``source`` itself, or those below the folder ``source``, sorted.

    A folder is searched recursively, following links (each real folder once) and skipping hidden
    names; the output folder, when inside it, is left out (see :func:`excluded_output`), and files
    named like predict.py's outputs are skipped, both noted. A single file is always scored.
    Raises UserError when ``source`` does not exist or holds no image, for an unreadable folder or a
    broken link, and for any image whose header is bad or beyond Pillow's decompression-bomb limit
    (every header is read up front, so that a bad file is named before any work starts).
    """
    from datasets.images import IMAGE_EXTENSIONS, check_image_header
    from utils.errors import UserError

    found = InputImages()
    if source.is_file():
        found.paths = [source]
    elif source.is_dir():
        _search(source, excluded_output(source, output), found, {})
        found.paths.sort()
        if not found.paths:
            skipped = (f"; {len(found.skipped)} files named like predict.py's outputs were not scored"
                       if found.skipped else "")
            raise UserError(f"no images in {source} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}{skipped}); "
                            "give an image or a folder of images as input=")
    elif source.is_symlink():
        raise UserError(f"input {source} is a broken link (to {os.readlink(source)}); give an image or a folder")
    else:
        raise UserError(f"input {source} does not exist; give an image or a folder of images")
    if found.skipped:
        found.notes.append(f"skipped {len(found.skipped)} files named like predict.py's outputs "
                           f"(*{', *'.join(OUTPUT_SUFFIXES)}), e.g. {found.skipped[0]}; "
                           "to score one, give it as input=")
    found.sizes = [check_image_header(path) for path in found.paths]
    return found


def output_stems(paths: Sequence[Path], source: Path) -> list[Path]:
    """Output path stem (relative to the output folder) per image, distinct for every image.

    An image's stem is its path below ``source`` without suffix. Images whose stems coincide (a.png,
    a.jpg, a.PNG; compared ignoring case, as on macOS and Windows file systems) keep their suffix
    in it (a_png, a_jpg); a stem still taken, e.g. by a_png.png, gets a number (a_png_2). Stems are
    given in path order, so the same folder always gets the same names.
    """
    relative = [p.relative_to(source) if source.is_dir() else Path(p.name) for p in paths]
    plain = [r.with_suffix("") for r in relative]

    def key(stem: Path) -> str:
        return stem.as_posix().casefold()

    counts: dict[str, int] = {}
    for stem in plain:
        counts[key(stem)] = counts.get(key(stem), 0) + 1
    taken = {key(stem) for stem in plain if counts[key(stem)] == 1}
    stems: list[Path] = []
    for r, stem in zip(relative, plain):
        if counts[key(stem)] == 1:
            stems.append(stem)
            continue
        base = r.parent / f"{r.stem}_{r.suffix.lstrip('.').lower()}"
        candidate, number = base, 2
        while key(candidate) in taken:
            candidate, number = r.parent / f"{base.name}_{number}", number + 1
        taken.add(key(candidate))
        stems.append(candidate)
    return stems


def output_files(output: Path, stem: Path) -> tuple[Path, Path]:
    """``(overlay, mask)`` paths of the image with output stem ``stem``."""
    overlay, mask = OUTPUT_SUFFIXES
    return output / f"{stem.as_posix()}{overlay}", output / f"{stem.as_posix()}{mask}"


def check_no_input_overwritten(paths: Sequence[Path], stems: Sequence[Path], output: Path) -> None:
    """UserError if an output file would be one of the input images (through links or odd folders)."""
    from utils.errors import UserError

    inputs = {_real(path): path for path in paths}
    for stem in stems:
        for target in output_files(output, stem):
            if _real(target) in inputs:
                raise UserError(f"writing {target} would overwrite the input image {inputs[_real(target)]}; "
                                "give an output= folder outside the input folder")


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

    from utils.errors import UserError

    finite = torch.isfinite(maps).flatten(1).all(1)
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0])
        raise UserError(f"the anomaly map of {paths[bad]} is not finite (NaN or inf), so it cannot be decided; "
                        f"the model of {checkpoint} overflows or holds NaN weights: retrain it (e.g. with a lower "
                        "train.lr) or give another checkpoint")


def load_run(checkpoint: Path, overrides: Sequence[str]
             ) -> tuple[MemKD, dict[str, Any], dict[str, float | None], torch.device]:
    """``(model in eval mode, config, thresholds, device)`` rebuilt from a best.pt and the
    evaluation.json beside it (its scoring settings and thresholds).

    UserError when the checkpoint is missing, unreadable, damaged, never evaluated, or does not
    fit the teacher this machine resolves (e.g. other ImageNet weights).
    """
    from models.build import build_model
    from engine.checkpoint import check_fits, load_checkpoint, load_student
    from engine.config import METHODS, SCHEMA, load_config, validate
    from utils.device import select_device
    from utils.errors import UserError
    from engine.thresholds import read_evaluation

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


def load_onnx_run(model_path: Path, overrides: Sequence[str]
                  ) -> tuple[OnnxScorer, dict[str, Any], dict[str, float | None], torch.device]:
    """``(scorer, config, thresholds, device)`` as :func:`load_run` gives them, from a graph written by
    export.py and the JSON beside it; onnxruntime scores on the CPU, at the JSON's input size.

    UserError when either file is missing or unreadable, or ``train.device=cuda`` is asked for.
    """
    import torch

    from engine.config import METHODS, load_config
    from utils.errors import UserError
    from engine.onnx_backend import OnnxScorer

    scorer = OnnxScorer(model_path)
    if scorer.method not in METHODS:
        raise UserError(f"{model_path}'s JSON names method {scorer.method!r}, not one of {', '.join(METHODS)}; "
                        "export the run again with export.py")
    config = {**load_config(scorer.method, overrides), "data.image_size": scorer.image_size}
    if config["train.device"] == "cuda":
        raise UserError("backend=onnx scores on the CPU with onnxruntime; drop train.device=cuda, or use backend=torch")
    return scorer, config, scorer.thresholds, torch.device("cpu")


def _write_png(path: Path, picture: Any) -> None:
    from utils.io import atomic_write

    atomic_write(path, lambda f: picture.save(f, format="PNG"))


def predict(options: dict[str, str], overrides: Sequence[str]) -> Path:
    """Score every input image, write overlays, masks and scores.csv; return the output folder.

    Images are scored at the model's input size, in batches of at most ``eval.batch_size`` images
    and :data:`BATCH_PIXELS` source pixels, and each overlay and mask is drawn tile by tile at the
    image's own size, so that memory stays bounded whatever the sizes of the images. scores.csv is
    written last; a run that fails part-way leaves none (an earlier one is removed at the start).
    """
    import torch

    from datasets.images import image_to_tensor, load_rgb
    from models.anomaly_map import image_scores
    from utils.errors import UserError
    from utils.io import write_text
    from engine.thresholds import image_threshold, mask_threshold
    from engine.visualize import overlay_and_mask

    # With backend=onnx the exported graph stands where the checkpoint would: default output, messages.
    checkpoint = Path(options["model" if options["backend"] == "onnx" else "checkpoint"]).expanduser()
    source = Path(options["input"]).expanduser()
    output = Path(options.get("output") or checkpoint.parent / "predictions").expanduser()
    found = find_images(source, output)
    stems = output_stems(found.paths, source)
    check_no_input_overwritten(found.paths, stems, output)
    model, config, thresholds, device = (load_onnx_run if options["backend"] == "onnx" else load_run)(checkpoint, overrides)
    decide = image_threshold(thresholds, options["threshold"], checkpoint)
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
        for batch in pixel_batches(found.sizes, config["eval.batch_size"], BATCH_PIXELS):
            paths = [found.paths[i] for i in batch]
            pictures = [load_rgb(path) for path in paths]
            inputs = torch.stack([image_to_tensor(p, config["data.image_size"]) for p in pictures]).to(device)
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
    print(f"{len(rows)} images scored, {flagged} anomalous (threshold={options['threshold']}: {decide:.6g}; "
          f"masks at {pixel:.6g})")
    return output


def main(argv: Sequence[str]) -> int:
    """Run predict.py; a UserError becomes one line on stderr and exit code 2 (``--debug``: traceback)."""
    from utils.errors import run_command

    return run_command(argv, USAGE, lambda args: f"predictions: {predict(*parse_args(args))}")

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
