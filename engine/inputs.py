"""Which files ``predict.py input=...`` scores, and where each one's outputs go.

Rules: a folder is searched recursively, following links (each folder once), skipping hidden files
and folders; outputs mirror its sub-folders; output names are unique even where input names differ
only by suffix or case; outputs are never read as inputs (an output folder inside the input folder
is left out of the search, files named like earlier outputs are skipped with a note) and never
overwrite an input. The datasets package (and with it torch) is imported only when a search runs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from utils.errors import UserError
from utils.io import broken_link

OUTPUT_SUFFIXES = ("_overlay.png", "_mask.png")  # what predict.py writes per image, after its output stem


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
        broken = broken_link(path)
        if broken:
            raise UserError(f"{broken}; remove it, or make it point to an image or a folder")
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
    elif broken_link(source):
        raise UserError(f"input {broken_link(source)}; give an image or a folder")
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

    inputs = {_real(path): path for path in paths}
    for stem in stems:
        for target in output_files(output, stem):
            if _real(target) in inputs:
                raise UserError(f"writing {target} would overwrite the input image {inputs[_real(target)]}; "
                                "give an output= folder outside the input folder")
