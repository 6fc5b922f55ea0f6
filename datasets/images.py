"""Reading images and masks of any PIL mode, and turning them into network inputs.

Everything here is deterministic and independent of the dataset layout:
``load_rgb`` / ``to_rgb`` give an 8-bit RGB picture whatever the file holds,
``load_mask`` gives a binary {0, 1} array at the network resolution, and
``image_to_tensor`` (= ``resize_rgb`` + ``normalise``) gives the ImageNet-normalised input.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from utils.errors import UserError
from utils.io import broken_link

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Lower-case suffixes we treat as images when listing folders.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}
)

_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)

# Images smaller than this on a side are placeholders or broken exports, not photographs to learn
# from (masks may be any size: they are resized with nearest-neighbour).
MIN_IMAGE_SIDE = 8

# Modes whose samples are not 8-bit: they need an explicit rescale, PIL's convert() would clip.
_WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def is_image_file(path: Path) -> bool:
    """True for a visible regular file whose suffix is a known image extension."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name (empty if it does not exist).

    UserError for a link with an image's name whose target is gone: skipping it would train or
    score on fewer images than the folder shows.
    """
    if not folder.is_dir():
        return []
    entries = sorted(folder.iterdir())
    broken = next((message for p in entries if p.suffix.lower() in IMAGE_EXTENSIONS and (message := broken_link(p))),
                  None)
    if broken:
        raise UserError(f"{broken}; restore the image or remove the link")
    return [p for p in entries if is_image_file(p)]


def _wide_to_uint8(img: Image.Image) -> np.ndarray:
    """Scale a 16-bit, 32-bit int or float single-channel image to uint8 without clipping.

    Integer data within 0..65535 is taken as 16-bit (the usual case: 16-bit PNG/TIFF opens as
    ``I;16`` or ``I``) and divided by 257 so that 65535 maps to 255. Float data within [0, 1]
    is multiplied by 255. Anything else is min-max stretched, as its range has no convention.
    """
    a = np.asarray(img).astype(np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
        a = a * 255.0
    elif img.mode != "F" and lo >= 0.0 and hi <= 65535.0:
        a = a / 257.0
    elif hi > lo:
        a = (a - lo) / (hi - lo) * 255.0
    else:
        a = np.zeros_like(a)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Return an 8-bit RGB copy of ``img``, whatever its mode.

    Transparent pixels (RGBA, LA, PA, or a tRNS transparency colour/palette entry) are composited onto black,
    so that whatever colour a file stores under alpha 0 cannot leak in. 16-bit and float
    images are rescaled to 8 bits (see ``_wide_to_uint8``), never clipped.
    Raises ValueError for a mode PIL cannot convert to RGB.
    """
    if img.mode == "RGB":
        return img.copy()
    if img.mode in _WIDE_MODES:
        return Image.fromarray(_wide_to_uint8(img), mode="L").convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = np.asarray(img.convert("RGBA")).astype(np.float64)
        rgb = rgba[..., :3] * (rgba[..., 3:4] / 255.0)
        return Image.fromarray(np.rint(rgb).astype(np.uint8), mode="RGB")
    return img.convert("RGB")


def _read(path: str | Path, decode: bool) -> Image.Image:
    """Open ``path`` (decoding all pixels when ``decode``); failures become a UserError naming it."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise UserError(f"image file is empty (0 bytes): {path}; replace it or delete it from the dataset")
        with Image.open(path) as img:
            if not decode:
                return img
            img.load()
            return img.copy()
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"image file not found: {path}; check the dataset folder") from None
    except PermissionError:
        raise UserError(f"cannot read image {path} (permission denied); fix its permissions or remove it") from None
    except Image.DecompressionBombError as exc:
        # Pillow refuses to decode more than twice Image.MAX_IMAGE_PIXELS: such a file would take
        # gigabytes of memory whether it is a real photograph or a crafted "bomb".
        raise UserError(f"image {path} is too large to decode safely ({str(exc).rstrip('.')}); downscale it "
                        "or remove it") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise UserError(
            f"cannot read image {path} ({exc}); the file is corrupt or not an image, replace or delete it"
        ) from None


def check_image_header(path: Path, min_side: int = 1) -> tuple[int, int]:
    """Cheaply verify that ``path`` is a non-empty file PIL recognises (header only, no decode)
    whose width and height are at least ``min_side`` pixels, and not beyond Pillow's
    decompression-bomb limit; return its ``(width, height)``.

    Raises UserError naming the file otherwise. Used when indexing a dataset, so that bad
    files are reported before training starts; truncated pixel data is caught at decode time.
    """
    width, height = _read(path, decode=False).size
    if min(width, height) < min_side:
        raise UserError(f"image {path} is only {width}x{height} pixels, too small to show anything "
                        f"(at least {min_side}x{min_side} needed); replace it or delete it from the dataset")
    return width, height


def load_rgb(path: str | Path) -> Image.Image:
    """Load ``path`` as an 8-bit RGB PIL image (any source mode, see ``to_rgb``).

    Raises UserError naming the file when it is missing, empty, corrupt, beyond Pillow's
    decompression-bomb limit or of an unusable mode.
    """
    img = _read(path, decode=True)
    if img.mode == "RGB":
        return img  # already a private copy: another one would double the memory of a large image
    try:
        return to_rgb(img)
    except ValueError as exc:
        raise UserError(
            f"cannot convert image {path} (mode {img.mode}) to RGB ({exc}); save it as an 8-bit RGB or grayscale PNG"
        ) from None


def resize_rgb(img: Image.Image, image_size: int) -> np.ndarray:
    """Resize an image to ``image_size`` x ``image_size`` (bilinear, antialiased); HxWx3 uint8.

    PIL's bilinear filter widens its support when downscaling, i.e. it is antialiased.
    The aspect ratio is not kept: anomaly benchmarks are evaluated on square resized images.
    """
    rgb = img if img.mode == "RGB" else to_rgb(img)
    return np.array(rgb.resize((image_size, image_size), Image.Resampling.BILINEAR), dtype=np.uint8)


def normalise(rgb: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float32 tensor, scaled to [0, 1] then ImageNet mean/std normalised."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div_(255.0)
    return (x - _MEAN) / _STD


def image_to_tensor(img: Image.Image, image_size: int) -> torch.Tensor:
    """A PIL image of any mode -> 3 x S x S ImageNet-normalised float tensor (S = ``image_size``)."""
    return normalise(resize_rgb(img, image_size))


def load_mask_at_own_size(path: str | Path, nonzero: bool = False) -> np.ndarray:
    """A ground-truth mask at its own resolution as a bool array (True = defect).

    8-bit masks (L, P, RGB, ...) are converted to grayscale and a pixel is a defect when its
    value is > 127, or > 0 when ``nonzero`` is set (VisA stores 0/255 or 0/1). 1-bit, 16-bit,
    32-bit and float masks always use > 0: zero is background in every convention, while their
    foreground value varies.
    """
    img = _read(path, decode=True)
    if img.mode == "1" or img.mode in _WIDE_MODES:
        return np.asarray(img) > 0
    try:
        grey = np.asarray(img.convert("L"))
    except ValueError as exc:
        raise UserError(f"cannot read mask {path} (mode {img.mode}: {exc}); save it as an 8-bit PNG with 0/255") from None
    return grey > (0 if nonzero else 127)


def load_mask(path: str | Path, image_size: int, nonzero: bool = False) -> np.ndarray:
    """Load a ground-truth mask as an ``image_size`` x ``image_size`` uint8 array of 0/1, binarised
    as :func:`load_mask_at_own_size` says at full resolution, then resized NEAREST, so the result
    is exactly binary."""
    fg = load_mask_at_own_size(path, nonzero)
    binary = Image.fromarray(fg.astype(np.uint8) * 255, mode="L")
    resized = binary.resize((image_size, image_size), Image.Resampling.NEAREST)
    return (np.asarray(resized) > 127).astype(np.uint8)


def image_size_of(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` of an image file, from its header (nothing decoded)."""
    width, height = _read(path, decode=False).size
    return height, width


def load_mask_values(path: str | Path) -> np.ndarray:
    """A mask at its own resolution as an H x W array of its grey values (uint8 for 8-bit masks,
    the raw values for 1-, 16- and 32-bit ones), nothing binarised: MVTec LOCO AD paints each
    defect with its own value."""
    img = _read(path, decode=True)
    if img.mode == "1" or img.mode in _WIDE_MODES:
        return np.asarray(img)
    try:
        return np.asarray(img.convert("L"))
    except ValueError as exc:
        raise UserError(f"cannot read mask {path} (mode {img.mode}: {exc}); save it as an 8-bit PNG") from None
