"""Export a trained run to ONNX: the whole scoring path in one graph, and a JSON of how to use it.
export.py runs :func:`main`.

    python export.py checkpoint=results/memkd-st/demo/brick/best.pt [output=model.onnx] [image_size=N] [--debug]

The graph takes a batch of normalised images [B, 3, S, S] (B free) and returns the anomaly maps
[B, S, S] and the image scores [B]: teacher, student, memories, the map as the run was evaluated
(its per-layer combination and Gaussian smoothing) and the score, all of it. The JSON beside it
(same stem) holds the thresholds, the input normalisation and size, the method, and the versions
the export was made and checked with; an export id inside the graph and in the JSON ties the two.
Before anything is written, onnxruntime scores a batch of images and must agree with PyTorch
within PARITY_TOLERANCE of the map's range; an export that does not is refused, never saved.
"""
from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import torch

from engine.config import IMAGE_SIZE_RULE, Key, check_value, parse_override, valid_image_size
from utils.errors import UserError, run_command

# torch and the models are imported inside the functions, so that --help and argument errors
# answer at once, as in predict.py and the training scripts.

USAGE = """usage: python export.py checkpoint=RUN/best.pt [output=FILE.onnx] [image_size=N] [--debug]

  checkpoint  best.pt of a finished (evaluated) run
  output      the ONNX file to write (default: best.onnx beside the checkpoint); the JSON of
              thresholds, normalisation and input size goes beside it with the same stem (.json)
  image_size  side S of the square input the graph takes (default: the run's data.image_size;
              a multiple of 32 from 64 to 1024); the thresholds were computed at the trained size
The graph: input "images" [B, 3, S, S] float32, RGB scaled to [0, 1] then ImageNet mean/std
normalised (B free); outputs "maps" [B, S, S] and "scores" [B] (the maximum of each map).
Score with it: python predict.py backend=onnx model=FILE.onnx input=IMAGES"""
# export.py's arguments, read by the project's one key=value parser (engine/config.py); image_size
# follows the one image-size rule of data.image_size.
OPTIONS: dict[str, Key] = {
    "checkpoint": Key(str, "best.pt of a finished (evaluated) run", path=True),
    "output": Key(str, "the .onnx file to write", lambda v: v.endswith(".onnx"), "an .onnx file, e.g. deploy/brick.onnx",
                  path=True),
    "image_size": Key(int, "side of the square input", valid_image_size, IMAGE_SIZE_RULE),
}
# The opset asked of the exporter; the JSON records the one the file really declares.
OPSET = 18
# ONNX and PyTorch maps may differ by at most this fraction of the PyTorch maps' range (max - min).
PARITY_TOLERANCE = 1e-4
# Packages the export needs beyond the runtime ones (torch.onnx's exporter and the parity check).
EXPORT_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
INPUT_NAME = "images"
# How the check's images are drawn: fixed, so that an export is checked the same way every time.
CHECK_SEED, CHECK_BATCH, EXAMPLE_BATCH = 0, 3, 2


def parse_args(argv: Sequence[str]) -> dict[str, Any]:
    """``{"checkpoint": Path, "output": Path | None, "image_size": int | None}`` from ``key=value``
    arguments; UserError on an unknown key, a malformed argument or an unusable value."""
    options: dict[str, Any] = {"output": None, "image_size": None}
    for arg in argv:
        key, value = parse_override(arg, OPTIONS)
        if value in (None, ""):
            raise UserError(f"cannot read argument '{arg}'; write key=value, e.g. checkpoint=results/.../best.pt")
        options[key] = check_value(key, value, OPTIONS)
    if "checkpoint" not in options:
        raise UserError("give checkpoint=..., e.g. checkpoint=results/memkd-st/demo/brick/best.pt")
    options["checkpoint"] = Path(options["checkpoint"])
    if options["output"] is not None:
        options["output"] = Path(options["output"])
    return options


def check_sidecar_free(sidecar: Path, onnx_path: Path) -> None:
    """UserError when the JSON an export of ``onnx_path`` writes would replace a file that is not an
    earlier export's JSON (``output=RUN/results.onnx`` would overwrite the run's results.json)."""
    import json

    from engine.onnx_backend import JSON_FORMAT

    if not sidecar.exists():
        return
    try:
        earlier = json.loads(sidecar.read_text()).get("format") == JSON_FORMAT
    except (OSError, ValueError, AttributeError):
        earlier = False
    if not earlier:
        raise UserError(f"output={onnx_path} would replace {sidecar}, which is not the JSON of an export; "
                        "give another output= name")


def check_exporter() -> None:
    """UserError naming what to install when the ONNX packages or a recent enough torch are missing."""
    import torch

    missing = [name for name in EXPORT_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"export.py needs {', '.join(missing)}; install with: pip install {' '.join(missing)}")
    if "dynamo" not in inspect.signature(torch.onnx.export).parameters:
        raise UserError(f"export.py needs torch's torch.export-based ONNX exporter (torch.onnx.export(dynamo=True)), "
                        f"which torch {torch.__version__} lacks; upgrade torch (export was tested with 2.14.1)")


def scoring_path(model: Any) -> torch.nn.Module:
    """An eval-mode module whose forward is ``model.anomaly_map(images)`` and the image scores of
    those maps: whatever the model computes, exported as it is, no formula repeated here."""
    import torch

    from models.anomaly_map import image_scores

    class ScoringPath(torch.nn.Module):
        def __init__(self, model: torch.nn.Module):
            super().__init__()
            self.model = model

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            maps = self.model.anomaly_map(images).float()
            return maps, image_scores(maps)

    # eval() on the wrapper too: an exporter that reads the top module's mode would otherwise
    # export BatchNorm with batch statistics (the legacy exporter did), scoring unlike the checkpoint.
    return ScoringPath(model).eval()


def check_images(image_size: int, batch: int) -> torch.Tensor:
    """A fixed batch [batch, 3, S, S] of normalised-image-like values (standard normal, seeded)."""
    import torch

    generator = torch.Generator().manual_seed(CHECK_SEED)
    return torch.randn(batch, 3, image_size, image_size, generator=generator)


def parity(torch_maps: torch.Tensor, torch_scores: torch.Tensor, onnx_maps: torch.Tensor,
           onnx_scores: torch.Tensor) -> dict[str, float]:
    """Max abs differences of maps and of scores, the PyTorch maps' range, and the larger of the two
    differences as a fraction of that range (the figure PARITY_TOLERANCE bounds)."""
    map_range = float(torch_maps.max() - torch_maps.min())
    map_difference = float((onnx_maps - torch_maps).abs().max())
    score_difference = float((onnx_scores - torch_scores).abs().max())
    worst = max(map_difference, score_difference)
    return {"max_abs_map_difference": map_difference, "max_abs_score_difference": score_difference,
            "map_range": map_range, "relative_difference": worst / map_range if map_range > 0 else float(worst > 0)}


def versions() -> dict[str, str]:
    """Versions of the packages that made and checked the export."""
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "torchvision", *EXPORT_PACKAGES)}


def export(options: dict[str, Any]) -> tuple[Path, Path]:
    """Export the run of ``options["checkpoint"]``; return ``(onnx path, json path)``.

    Nothing is written unless onnxruntime's maps and scores agree with PyTorch's on a fixed batch
    within PARITY_TOLERANCE of the map range; the ONNX file and its JSON are each replaced atomically.
    """
    import os
    import secrets

    import torch

    from datasets.images import IMAGENET_MEAN, IMAGENET_STD
    from engine.inference import load_run
    from engine.onnx_backend import (DECISION_DIGEST_KEY, EXPORT_ID_KEY, JSON_FORMAT, JSON_FORMAT_VERSION,
                                     OUTPUT_NAMES, OnnxScorer, decision_digest, sidecar_path)
    from utils.io import write_json

    checkpoint = options["checkpoint"]
    onnx_path = options["output"] or checkpoint.with_suffix(".onnx")
    check_sidecar_free(sidecar_path(onnx_path), onnx_path)
    check_exporter()
    # On the CPU: the graph is device-neutral, and the parity check runs onnxruntime's CPU provider.
    model, settings, thresholds, _ = load_run(checkpoint, {"train.device": "cpu"})
    trained_size = settings.data.image_size
    size = options["image_size"] or trained_size
    try:
        onnx_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {onnx_path.parent} ({e.strerror}); "
                        "give output= in a writable folder") from None

    path = scoring_path(model)
    program = torch.onnx.export(
        path, (check_images(size, EXAMPLE_BATCH),), dynamo=True, opset_version=OPSET, verbose=False,
        input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
        dynamic_shapes=({0: torch.export.Dim("batch")},))
    opset = next(o.version for o in program.model_proto.opset_import if o.domain in ("", "ai.onnx"))
    # The same id inside the graph and in its JSON: the scorer refuses a JSON of another export.
    export_id = secrets.token_hex(8)
    metadata = {
        "format": JSON_FORMAT, "format_version": JSON_FORMAT_VERSION, "export_id": export_id, "model": onnx_path.name,
        "name": settings.method_name, "method": settings.method,
        "memory_enabled": settings.memory.enabled, "backbone": settings.model.backbone,
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, size, size], "dtype": "float32", "layout": "NCHW",
                  "image_size": size, "channels": "RGB", "scale": 1 / 255,
                  "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                  "resize": "to image_size x image_size, bilinear (PIL, antialiased), aspect ratio not kept"},
        "outputs": {"maps": ["batch", size, size], "scores": ["batch"]},
        "trained_image_size": trained_size,
        "thresholds": thresholds,
        "opset": opset, "versions": versions(),
        "checkpoint": str(checkpoint.resolve()), "config": settings.flat(),
    }
    program.model.metadata_props[EXPORT_ID_KEY] = export_id
    program.model.metadata_props[DECISION_DIGEST_KEY] = decision_digest(metadata)

    # Saved and checked under a temporary name in the same folder, then renamed into place; the
    # name is one utils.io.remove_stale_temporaries clears if the process is killed meanwhile.
    temporary = onnx_path.with_name(f".{onnx_path.name}.{secrets.token_hex(4)}.tmp")
    try:
        program.save(temporary)
        images = check_images(size, CHECK_BATCH)
        with torch.no_grad():
            torch_maps, torch_scores = path(images)
        onnx_maps, onnx_scores = OnnxScorer(temporary, metadata).score(images)
        found = parity(torch_maps, torch_scores, onnx_maps, onnx_scores)
        if not found["relative_difference"] <= PARITY_TOLERANCE:
            raise UserError(f"the exported graph scores unlike the checkpoint (max map difference "
                            f"{found['max_abs_map_difference']:.3g}, score difference "
                            f"{found['max_abs_score_difference']:.3g}, map range {found['map_range']:.3g}: over "
                            f"{PARITY_TOLERANCE:g} of it); nothing was written: try another torch/onnxscript version")
        metadata["parity"] = {**found, "batch": CHECK_BATCH, "input": f"standard normal, seed {CHECK_SEED}"}
        os.replace(temporary, onnx_path)
    except OSError as e:
        raise UserError(f"cannot write {onnx_path} ({e.strerror or e}); give output= in a writable folder") from None
    finally:
        temporary.unlink(missing_ok=True)
    try:
        write_json(sidecar_path(onnx_path), metadata)
    except UserError as e:
        onnx_path.unlink(missing_ok=True)  # a graph without its JSON cannot be used: export nothing
        raise UserError(f"cannot write {sidecar_path(onnx_path)} ({str(e).split('(', 1)[-1].split(')')[0]}); "
                        "nothing was exported; give output= in a writable folder") from None
    note = "" if size == trained_size else f" (trained at {trained_size} px: its thresholds were set at that size)"
    print(f"{metadata['name']} at {size} px{note}, opset {opset}: onnxruntime vs PyTorch max map difference "
          f"{found['max_abs_map_difference']:.3g} (map range {found['map_range']:.3g}), "
          f"max score difference {found['max_abs_score_difference']:.3g}")
    return onnx_path, sidecar_path(onnx_path)


def main(argv: Sequence[str]) -> int:
    """Run export.py; a UserError becomes one line on stderr and exit code 2 (``--debug``: traceback)."""
    def work(args: list[str]) -> str:
        onnx_path, json_path = export(parse_args(args))
        return f"onnx: {onnx_path} (and {json_path.name})"

    return run_command(argv, USAGE, work)
