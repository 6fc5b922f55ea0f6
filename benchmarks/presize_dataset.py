"""Copy an MVTec-layout dataset with its images already at the size a run will use.

    python benchmarks/presize_dataset.py SOURCE TARGET --size 128

A run with ``data.image_size=SIZE`` resizes every image when it loads it. This writes each image
already resized exactly as the loader resizes it (``datasets.images``: RGB, bilinear with
antialiasing) and each ground-truth mask already binarised and resized (nearest), so that a run
with ``data.image_size=SIZE`` on TARGET reads the very same pixels as on SOURCE from a copy a
fraction of its size: a way to ship a dataset to a remote GPU machine whose upload is limited.
Every written file is read back through the loader and compared with what SOURCE gives; any
difference is an error. Other files (licences, CSVs) are copied unchanged. Images are kept in
lossless formats only (PNG, BMP, TIFF): re-encoding a JPEG would change its pixels.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from datasets.images import load_mask, load_rgb, resize_rgb  # noqa: E402
from utils.errors import UserError, run_command  # noqa: E402

USAGE = __doc__.splitlines()[2].strip()
LOSSLESS = {".png", ".bmp", ".tif", ".tiff"}
LOSSY = {".jpg", ".jpeg", ".webp"}
MASK_FOLDER = "ground_truth"  # MVTec layout: test masks live under {category}/ground_truth/


def presize(source: Path, target: Path, size: int) -> tuple[int, int]:
    """Write the pre-resized copy of ``source`` into ``target``; return (images, masks) written.

    The copy is written into a temporary folder beside ``target`` and renamed into place only once
    every file has been checked, so a failed run leaves no partial copy. Raises UserError when
    ``target`` is ``source``, inside it or a parent of it, already exists and is not empty, for a
    lossy image format, or when a written file does not load exactly as its source does.
    """
    source, target = source.resolve(), target.resolve()
    if not source.is_dir():
        raise UserError(f"{source} is not a folder; give the dataset root (the folder of the categories)")
    if target == source or source in target.parents or target in source.parents:
        raise UserError(f"the copy {target} must lie outside the dataset {source}, and not hold it")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"{target} already exists and is not an empty folder: its old files would be mixed "
                        "with the copy; give a new folder")
    if size < 8:
        raise UserError(f"--size must be at least 8 pixels, not {size}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        images, masks = _write_copy(source, staging, size)
        if target.exists():
            target.rmdir()  # empty, checked above
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return images, masks


def _write_copy(source: Path, target: Path, size: int) -> tuple[int, int]:
    images = masks = 0
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        out = target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        suffix = path.suffix.lower()
        if suffix in LOSSY:
            raise UserError(f"{path} is a {suffix} image: re-encoding it would change its pixels; "
                            "keep such datasets at full size")
        if suffix not in LOSSLESS:
            shutil.copyfile(path, out)
        elif MASK_FOLDER in path.relative_to(source).parts:
            mask = load_mask(path, size)
            Image.fromarray(mask * 255, mode="L").save(out)
            _same(load_mask(out, size), mask, out)
            masks += 1
        else:
            pixels = resize_rgb(load_rgb(path), size)
            Image.fromarray(pixels, mode="RGB").save(out)
            _same(resize_rgb(load_rgb(out), size), pixels, out)
            images += 1
    return images, masks


def _same(reloaded: np.ndarray, expected: np.ndarray, path: Path) -> None:
    if not np.array_equal(reloaded, expected):
        raise UserError(f"{path} does not load as its source does; this dataset cannot be pre-resized")


class _Parser(argparse.ArgumentParser):
    """Bad arguments are a UserError (one line, exit code 2), as in every script of the project."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message}; usage: {USAGE}")


def main(argv: list[str]) -> int:
    """Parse SOURCE TARGET --size N and write the copy; 2 with a one-line error on bad input."""
    def work(args: list[str]) -> str:
        parser = _Parser(description=__doc__.splitlines()[0])
        parser.add_argument("source", type=Path)
        parser.add_argument("target", type=Path)
        parser.add_argument("--size", type=int, required=True)
        options = parser.parse_args(args)
        images, masks = presize(options.source, options.target, options.size)
        return (f"wrote {images} images and {masks} masks at {options.size} px into {options.target.resolve()}; "
                f"each loads exactly as its source does with data.image_size={options.size}")

    return run_command(argv, USAGE, work)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
