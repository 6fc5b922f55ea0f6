"""Where evaluation time goes on an MVTec-sized category: the model, the metrics, the pictures.

Times each stage of ``engine.run.run_category``'s evaluation on a synthetic test set of MVTec AD's
size: 150 test images and 25 validation images of 256x256 (the model's forward passes), anomaly
maps with 1-3 blob-shaped defects on 30 % of the images (the metrics), and photo-like pictures
(smooth texture plus sensor noise, so PNG compression costs what it costs on real photographs).
The model is the real MemKD network with a random teacher: its speed does not depend on weights.

Run: python benchmarks/eval_overhead.py [--method st|rd] [--backbone resnet18] [--rows 6] [--device auto]
Prints figures only: seconds per stage and its share of the whole evaluation.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from datasets.images import normalise  # noqa: E402
from engine.model import build_run_model  # noqa: E402
from models.anomaly_map import gaussian_blur, image_scores  # noqa: E402
from models.folding import folded_for_inference  # noqa: E402
from engine.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from engine.config import load_config  # noqa: E402
from utils.device import memory_format, select_device  # noqa: E402
from utils.metrics import evaluate_all, threshold_from_normal_scores  # noqa: E402
from engine.thresholds import thresholds_from, write_evaluation  # noqa: E402
from engine.pictures import save_pictures  # noqa: E402


def synthetic_test_set(n: int = 150, size: int = 256, anomalous: float = 0.3, seed: int = 0) -> dict[str, torch.Tensor]:
    """``anomaly_maps``-shaped results: smooth noisy maps, higher inside 1-3 elliptic defects per anomaly."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(n, dtype=bool)
    labels[rng.choice(n, round(n * anomalous), replace=False)] = True
    yy, xx = np.mgrid[0:size, 0:size]
    masks = np.zeros((n, size, size), dtype=np.float32)
    for i in np.flatnonzero(labels):
        for _ in range(rng.integers(1, 4)):
            cy, cx, ry, rx = *rng.uniform(30, size - 30, 2), *rng.uniform(5, 30, 2)
            masks[i][((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = 1.0
    noise = torch.from_numpy(rng.standard_normal((n, size, size)).astype(np.float32))
    maps = gaussian_blur(torch.from_numpy(masks) * 0.6 + noise, 4.0) + 1.0
    return {"maps": maps, "masks": torch.from_numpy(masks), "labels": torch.from_numpy(labels).long(),
            "has_mask": torch.ones(n, dtype=torch.bool)}


def photo_like_images(n: int, size: int = 256, seed: int = 1) -> list[dict[str, Any]]:
    """Dataset items (``image``, ``defect``) whose pixels look like photographs to a PNG encoder."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        coarse = torch.from_numpy(rng.uniform(40, 200, (1, 3, 16, 16)).astype(np.float32))
        smooth = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0]
        pixels = smooth.permute(1, 2, 0).numpy() + rng.normal(0, 4, (size, size, 3))
        items.append({"image": normalise(np.clip(pixels, 0, 255).astype(np.uint8)), "defect": f"type{i % 3}"})
    return items


def timed(fn: Callable[[], Any], repeats: int = 1) -> tuple[float, Any]:
    """Median wall time of ``repeats`` calls of ``fn``, and its last result."""
    seconds, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), result


@torch.no_grad()
def model_seconds(method: str, backbone: str, device_name: str, images: int, batch: int, size: int) -> tuple[float, str]:
    """Seconds for the anomaly maps of ``images`` images (the engine's forward passes), and the device."""
    config = load_config(method, [f"model.backbone={backbone}", "model.pretrained=false"])
    device = select_device(device_name)
    model = build_run_model(config).to(device).eval()
    inputs = torch.randn(batch, 3, size, size, device=device)
    model.anomaly_map(inputs[:2])  # warm-up: first-call allocations, cuDNN autotuning
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    with folded_for_inference(model, memory_format(config.train.channels_last)):  # as engine/evaluation.py scores, folding included
        for start in range(0, images, batch):
            model.anomaly_map(inputs[: min(batch, images - start)]).float().cpu()
    return time.perf_counter() - started, str(device)


def checkpoint_seconds(method: str, backbone: str, folder: Path, test: dict[str, torch.Tensor],
                       metrics: dict[str, float]) -> float:
    """Seconds to write evaluation.json (scoring settings, thresholds) beside best.pt."""
    config = load_config(method, [f"model.backbone={backbone}", "model.pretrained=false"])
    model = build_run_model(config)
    path = folder / "best.pt"
    save_checkpoint(path, settings=config, student=model.student,
                    fingerprint=model.teacher_fingerprint, data_digest="synthetic", epoch=1)
    state = load_checkpoint(path)
    return timed(lambda: write_evaluation(path, state, config.scope("eval"), thresholds_from(metrics, test["maps"])))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=("st", "rd"), default="st")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--rows", type=int, default=load_config("st").eval.max_pictures, help="eval.max_pictures")
    parser.add_argument("--test-images", type=int, default=150)
    parser.add_argument("--val-images", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    size = 256

    test = synthetic_test_set(args.test_images, size)
    val = synthetic_test_set(args.val_images, size, anomalous=0.0, seed=2)
    items = photo_like_images(args.test_images, size)
    forward, device = model_seconds(args.method, args.backbone, args.device,
                                    args.test_images + args.val_images, args.batch_size, size)

    def metrics_stage() -> dict[str, float]:
        found = evaluate_all(image_scores(test["maps"]), test["labels"], test["maps"], test["masks"], test["has_mask"])
        found["normal_threshold"] = threshold_from_normal_scores(image_scores(val["maps"]))
        return found

    metrics_time, metrics = timed(metrics_stage, repeats=3)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rewrite = checkpoint_seconds(args.method, args.backbone, folder, test, metrics)
        thresholds = thresholds_from(metrics, test["maps"])
        draw = lambda: save_pictures(folder, items, test, metrics, thresholds, args.rows)  # noqa: E731
        first_draw = timed(draw)[0]  # pays matplotlib's import and font cache, once per process
        warm_draw = timed(draw, repeats=3)[0]
        sizes = {p.name: p.stat().st_size for p in folder.glob("*.png")}

    total = forward + metrics_time + rewrite + warm_draw
    print(f"evaluation of {args.test_images} test + {args.val_images} validation images at {size} px: "
          f"{args.method.upper()} {args.backbone}, {device}, {torch.get_num_threads()} CPU threads")
    stages = [("model: anomaly maps", forward), ("metrics: evaluate_all + normal threshold", metrics_time),
              ("thresholds into evaluation.json", rewrite), (f"pictures: examples ({args.rows} rows) + roc", warm_draw)]
    for name, seconds in stages:
        print(f"  {name:<42} {seconds:7.2f} s  {100 * seconds / total:5.1f} %")
    print(f"  {'total':<42} {total:7.2f} s")
    print(f"  first pictures of a process (matplotlib import included): {first_draw:.2f} s; "
          + ", ".join(f"{name} {size / 1e3:.0f} kB" for name, size in sorted(sizes.items())))


if __name__ == "__main__":
    main()
