"""How long MVTec LOCO AD's metrics take on a full-size category, and how much memory they hold.

    python benchmarks/loco_metrics.py [--images 300] [--height 1100] [--width 1600] [--size 256] [--folder DIR]

Writes a synthetic LOCO category of the real size into ``--folder`` (a temporary folder by
default): ``--images`` test images of ``--width`` x ``--height`` (a third good, the rest logical
and structural anomalies with one to three mask files each, painted with the defect's value, and
a defects_config.json with both saturation kinds), then times engine/benchmark_metrics.py's
``loco_metrics`` on random smooth maps at the network's ``--size``: every map resized to its
mask's size, every mask file read, the sPRO curves of both anomaly types and pixel AUROC. Prints
the seconds, the pixel scores streamed, and the peak memory the metrics allocated in Python
(tracemalloc, which sees numpy's arrays) against what sorting all pixel scores at once would take.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from datasets.build import build_datasets  # noqa: E402
from datasets.layouts import loco_saturation_rules  # noqa: E402
from engine.benchmark_metrics import loco_metrics  # noqa: E402

DEFECTS = [{"defect_name": "missing", "pixel_value": 255, "saturation_threshold": 1.0, "relative_saturation": True},
           {"defect_name": "extra", "pixel_value": 254, "saturation_threshold": 2000, "relative_saturation": False},
           {"defect_name": "damaged", "pixel_value": 253, "saturation_threshold": 0.5, "relative_saturation": True}]


def write_category(folder: Path, images: int, height: int, width: int) -> Path:
    """A LOCO category of ``images`` test images at full size (plain images: only their size is read)."""
    rng = np.random.default_rng(0)
    category = folder / "synthetic"
    plain = Image.new("RGB", (width, height), (90, 90, 90))
    for split in ("train", "validation"):
        (category / split / "good").mkdir(parents=True, exist_ok=True)
        plain.save(category / split / "good" / "000.png")
    kinds = ("good", "logical_anomalies", "structural_anomalies")
    for index in range(images):
        kind = kinds[index % 3]
        (category / "test" / kind).mkdir(parents=True, exist_ok=True)
        plain.save(category / "test" / kind / f"{index:03d}.png")
        if kind == "good":
            continue
        for file_index in range(int(rng.integers(1, 4))):
            mask = np.zeros((height, width), np.uint8)
            h, w = int(rng.integers(height // 20, height // 4)), int(rng.integers(width // 20, width // 4))
            y, x = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
            mask[y:y + h, x:x + w] = DEFECTS[int(rng.integers(0, 3))]["pixel_value"]
            target = category / "ground_truth" / kind / f"{index:03d}" / f"{file_index:03d}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(target)
    (category / "defects_config.json").write_text(json.dumps(DEFECTS))
    return folder


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--height", type=int, default=1100)
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--size", type=int, default=256, help="the network's resolution of the maps")
    parser.add_argument("--folder", type=Path, default=None, help="where to write the category (default: temporary)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as temporary:
        root = args.folder or Path(temporary)
        started = time.perf_counter()
        write_category(root, args.images, args.height, args.width)
        splits = build_datasets("mvtec_loco", root, "synthetic", args.size, 0.1, seed=0)
        written = time.perf_counter() - started
        samples = splits.test.samples
        generator = torch.Generator().manual_seed(0)
        coarse = torch.rand(len(samples), 1, args.size // 16, args.size // 16, generator=generator)
        maps = torch.nn.functional.interpolate(coarse, size=(args.size, args.size), mode="bilinear")[:, 0]
        masks = torch.stack([splits.test[i]["mask"][0] for i in range(len(samples))])
        rules = loco_saturation_rules(root, "synthetic")
        tracemalloc.start()
        started = time.perf_counter()
        results = loco_metrics(samples, maps, masks, maps.amax((1, 2)), rules)
        seconds = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    pixels = len(samples) * args.height * args.width
    regions = sum(len(s.masks) for s in samples)
    print(f"{len(samples)} test images of {args.width}x{args.height} ({regions} mask files), maps at {args.size} px, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads (category written in {written:.0f} s)")
    print(f"loco_metrics: {seconds:.1f} s ({1000 * seconds / len(samples):.0f} ms per image) for {pixels / 1e6:.0f} M "
          f"pixel scores; peak memory allocated {peak / 2**20:.0f} MiB, against {pixels * 12 / 2**30:.1f} GiB to sort "
          f"every score with its label at once (float32 score + int64 index)")
    print("  " + ", ".join(f"{key} {100 * value:.1f}" for key, value in results.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
