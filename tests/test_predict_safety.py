"""predict.py as a careless or hostile user drives it: no silent wrong answer, no output that
replaces another or is read back as an input, and memory bounded whatever the image sizes.

The model is replaced (through ``inference.load_run``) by a tiny stand-in whose anomaly map is the
brightness of the ImageNet-normalised input, so these tests need no training and know each score:
a white image is anomalous, a black one normal. tests/test_evaluation_outputs.py runs predict.py
on a really trained checkpoint.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import engine.inference as inference
from engine.config import load_config
import engine.inputs as inputs
import engine.pictures
from tests.test_io_safety import bomb_png
from engine.pictures import overlay_and_mask, resize_map_region, tiles

MODEL_SIZE = 32
THRESHOLDS = {"normal_threshold": 0.5, "image_f1_threshold": 0.5, "pixel_f1_threshold": 0.5, "map_low": -2.0}


class BrightnessModel:
    """Anomaly map = channel mean of the input at the model's size; records each batch's shape."""

    def __init__(self, poison: float | None = None) -> None:
        self.batches: list[tuple[int, ...]] = []
        self.poison = poison  # an input mean above which the map turns NaN, as an overflowing model's would

    def anomaly_map(self, images: torch.Tensor) -> torch.Tensor:
        self.batches.append(tuple(images.shape))
        maps = images.mean(1)
        if self.poison is not None:
            maps[maps.flatten(1).mean(1) > self.poison] = float("nan")
        return maps


@pytest.fixture
def model(monkeypatch) -> BrightnessModel:
    """The stand-in model, returned by inference.load_run for any checkpoint."""
    stand_in = BrightnessModel()
    config = load_config("st", ["eval.batch_size=4"])
    # The stand-in scores at a size below data.image_size's rule, which binds real networks only.
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, image_size=MODEL_SIZE))
    monkeypatch.setattr(inference, "load_run", lambda checkpoint, overrides: (stand_in, config, dict(THRESHOLDS),
                                                                            torch.device("cpu")))
    return stand_in


def picture(path: Path, size: tuple[int, int], value: int = 0) -> Path:
    """A flat grey picture of ``size`` (width, height) at ``path``; 255 is anomalous, 0 normal."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)
    return path


def run(tmp_path: Path, source: Path, output: Path | None, capsys, *extra: str) -> tuple[int, str, str]:
    """inference.main on ``source``; returns (exit code, stdout, stderr)."""
    capsys.readouterr()
    args = [f"checkpoint={tmp_path / 'run' / 'best.pt'}", f"input={source}", *extra]
    if output is not None:
        args.append(f"output={output}")
    code = inference.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def scores(output: Path) -> list[dict[str, str]]:
    with (output / "scores.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def one_line_error(err: str, *fragments: str) -> None:
    line = err.strip()
    assert line.startswith("error: ") and "\n" not in line, err
    for fragment in fragments:
        assert fragment in line, (fragment, line)


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- non-finite scores


def test_a_nan_map_is_an_error_never_a_normal_decision(tmp_path, model, capsys):
    model.poison = 0.0  # the white image's map turns NaN
    source = tmp_path / "images"
    picture(source / "a_dark.png", (40, 30), 0)
    picture(source / "b_white.png", (40, 30), 255)
    out = tmp_path / "out"
    (out).mkdir()
    (out / "scores.csv").write_text("path,score,threshold,decision\nold.png,0.1,0.5,normal\n")

    code, stdout, err = run(tmp_path, source, out, capsys)

    assert code == 2
    one_line_error(err, f"the anomaly map of {source / 'b_white.png'} is not finite", "retrain")
    assert "normal" not in stdout
    assert not (out / "scores.csv").exists(), "a stale scores.csv must not outlive a failed run"


def test_an_infinite_map_is_an_error_too(tmp_path, model, capsys, monkeypatch):
    monkeypatch.setattr(model, "anomaly_map", lambda images: torch.full((len(images), MODEL_SIZE, MODEL_SIZE),
                                                                        float("inf")))
    picture(tmp_path / "a.png", (20, 20))
    code, _, err = run(tmp_path, tmp_path / "a.png", tmp_path / "out", capsys)
    assert code == 2
    one_line_error(err, "is not finite (NaN or inf)")


# --------------------------------------------------------------------------- unique output names


def test_output_stems_are_distinct_for_every_input(tmp_path):
    source = tmp_path  # a folder: stems are paths below it
    groups = [
        ["a.png", "a_png.png"],
        ["a.png", "a.PNG"],
        ["a.png", "a.PNG", "a_png.png", "a.jpg", "a_jpg.jpg", "a_png_2.png"],
        ["A.png", "a.jpg"],  # one file on case-insensitive file systems
        ["sub/a.png", "sub/a.PNG", "sub/a_png.bmp", "sub.png"],
    ]
    for names in groups:
        stems = inputs.output_stems([source / n for n in sorted(names)], source)
        assert len({s.as_posix().casefold() for s in stems}) == len(names), (names, stems)
    # Names that do not clash keep the plain stem, and the numbering is stable.
    assert inputs.output_stems([source / "x.png", source / "sub/y.jpg"], source) == [Path("x"), Path("sub/y")]
    assert inputs.output_stems([source / n for n in ["a.PNG", "a.png", "a_png.png"]], source) == [
        Path("a_png_2"), Path("a_png_3"), Path("a_png")]


def _case_sensitive(folder: Path) -> bool:
    (folder / "probe").write_text("")
    sensitive = not (folder / "PROBE").exists()
    (folder / "probe").unlink()
    return sensitive


def test_images_whose_names_clash_each_get_their_own_outputs(tmp_path, model, capsys):
    source = tmp_path / "images"
    source.mkdir()
    if not _case_sensitive(source):
        pytest.skip("needs a case-sensitive file system to hold a.png and a.PNG")
    # Each image has its own size, so each output shows which image it was drawn from.
    sizes = {"a.png": (40, 30), "a.PNG": (50, 20), "a_png.png": (30, 60), "a.jpg": (24, 24)}
    for name, size in sizes.items():
        picture(source / name, size, 255 if name == "a.PNG" else 0)
    out = tmp_path / "out"

    code, _, err = run(tmp_path, source, out, capsys)

    assert code == 0, err
    assert len(files_under(out)) == 2 * len(sizes) + 1, "an overlay and a mask per image, and scores.csv"
    rows = scores(out)
    assert sorted(Path(r["path"]).name for r in rows) == sorted(sizes)
    outputs = [r["overlay"] for r in rows] + [r["mask"] for r in rows]
    assert len(set(outputs)) == 2 * len(sizes)
    assert sorted(outputs) == [f for f in files_under(out) if f != "scores.csv"]
    for row in rows:
        size = sizes[Path(row["path"]).name]
        with Image.open(out / row["overlay"]) as overlay, Image.open(out / row["mask"]) as mask:
            assert overlay.size == mask.size == size, row
            assert np.asarray(mask).any() == (row["decision"] == "anomalous")


# --------------------------------------------------------------------------- input and output folders


def test_output_equal_to_input_is_refused_and_nothing_is_written(tmp_path, model, capsys):
    source = tmp_path / "images"
    picture(source / "a.png", (20, 20))
    code, _, err = run(tmp_path, source, source, capsys)
    assert code == 2
    one_line_error(err, f"output={source} is the input folder itself", f"output={source / 'predictions'}")
    assert files_under(source) == ["a.png"]


def test_output_inside_input_with_input_images_is_refused(tmp_path, model, capsys):
    source = tmp_path / "images"
    picture(source / "a.png", (20, 20))
    picture(source / "sub" / "b.png", (20, 20))
    code, _, err = run(tmp_path, source, source / "sub", capsys)
    assert code == 2
    one_line_error(err, "lies inside input=",
                   f"holds images that are not predictions (e.g. {source / 'sub' / 'b.png'})")
    assert files_under(source) == ["a.png", "sub/b.png"]


def test_output_inside_input_is_left_out_and_a_rerun_scores_the_same_images(tmp_path, model, capsys):
    source = tmp_path / "images"
    picture(source / "a.png", (20, 20))
    picture(source / "sub" / "b.png", (20, 20), 255)
    out = source / "predictions"

    first = run(tmp_path, source, out, capsys)
    rows = scores(out)
    second = run(tmp_path, source, out, capsys)

    assert first[0] == second[0] == 0
    assert [r["path"] for r in scores(out)] == [r["path"] for r in rows] == [str(source / "a.png"),
                                                                           str(source / "sub" / "b.png")]
    assert f"note: left out the output folder {out}" in second[2]
    assert files_under(out) == ["a_mask.png", "a_overlay.png", "scores.csv", "sub/b_mask.png", "sub/b_overlay.png"]


def test_files_named_like_outputs_are_skipped_with_a_note(tmp_path, model, capsys):
    source = tmp_path / "images"
    picture(source / "a.png", (20, 20))
    picture(source / "old" / "a_overlay.png", (20, 20))
    picture(source / "old" / "a_MASK.png", (20, 20))
    out = tmp_path / "out"

    code, _, err = run(tmp_path, source, out, capsys)

    assert code == 0
    assert [Path(r["path"]).name for r in scores(out)] == ["a.png"]
    assert "note: skipped 2 files named like predict.py's outputs" in err and "give it as input=" in err
    # Given on its own, such a file is scored: the user asked for it by name.
    code, _, _ = run(tmp_path, source / "old" / "a_overlay.png", tmp_path / "single", capsys)
    assert code == 0 and [Path(r["path"]).name for r in scores(tmp_path / "single")] == ["a_overlay.png"]


def test_a_folder_of_nothing_but_outputs_says_so(tmp_path, model, capsys):
    source = tmp_path / "images"
    picture(source / "a_overlay.png", (20, 20))
    code, _, err = run(tmp_path, source, tmp_path / "out", capsys)
    assert code == 2
    one_line_error(err, f"no images in {source}", "1 files named like predict.py's outputs were not scored")


def test_a_broken_link_is_reported(tmp_path, model, capsys):
    source = tmp_path / "images"
    picture(source / "a.png", (20, 20))
    (source / "b.png").symlink_to(tmp_path / "gone.png")
    code, _, err = run(tmp_path, source, tmp_path / "out", capsys)
    assert code == 2
    one_line_error(err, f"{source / 'b.png'} is a broken link", "remove it")
    assert not (tmp_path / "out").exists()


def test_an_unreadable_folder_is_reported(tmp_path, model, capsys, monkeypatch):
    source = tmp_path / "images"
    picture(source / "a.png", (20, 20))
    picture(source / "locked" / "b.png", (20, 20))
    real_scandir = os.scandir

    def scandir(path):
        # chmod 000 does not stop root, under which tests may run: refuse the way the kernel would.
        if Path(path) == source / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    code, _, err = run(tmp_path, source, tmp_path / "out", capsys)
    assert code == 2
    one_line_error(err, f"cannot read folder {source / 'locked'} (Permission denied)", "fix its permissions")


def test_linked_folders_are_searched_once(tmp_path, model, capsys):
    elsewhere = tmp_path / "elsewhere"
    picture(elsewhere / "c.png", (20, 20))
    source = tmp_path / "images"
    picture(source / "a.png", (20, 20))
    (source / "more").symlink_to(elsewhere)
    (source / "loop").symlink_to(source)  # a link back up: must not be searched forever

    code, _, err = run(tmp_path, source, tmp_path / "out", capsys)

    assert code == 0
    assert [r["path"] for r in scores(tmp_path / "out")] == [str(source / "a.png"), str(source / "more" / "c.png")]
    assert f"note: left out {source / 'loop'}: it is {source} again, through a link" in err


def test_an_oversized_input_image_is_a_one_line_error(tmp_path, model, capsys):
    source = tmp_path / "images"
    picture(source / "a.png", (20, 20))
    bomb_png(source / "huge.png")
    code, _, err = run(tmp_path, source, tmp_path / "out", capsys)
    assert code == 2
    one_line_error(err, f"image {source / 'huge.png'} is too large to decode safely")
    assert not (tmp_path / "out").exists(), "named before any work starts"


# --------------------------------------------------------------------------- bounded memory


def test_region_resize_matches_torch_bilinear():
    amap = np.random.default_rng(0).random((MODEL_SIZE, MODEL_SIZE)).astype(np.float32)
    for height, width in [(37, 91), (480, 640), (5, 3), (MODEL_SIZE, MODEL_SIZE), (700, 1)]:
        expected = torch.nn.functional.interpolate(torch.from_numpy(amap)[None, None], size=(height, width),
                                                   mode="bilinear", align_corners=False)[0, 0].numpy()
        tiled = np.full((height, width), np.nan, np.float32)
        covered = 0
        for rows, cols in tiles(height, width, 500):
            assert (rows[1] - rows[0]) * (cols[1] - cols[0]) <= 500
            tiled[rows[0]:rows[1], cols[0]:cols[1]] = resize_map_region(amap, height, width, rows, cols)
            covered += (rows[1] - rows[0]) * (cols[1] - cols[0])
        assert covered == height * width
        np.testing.assert_allclose(tiled, expected, rtol=0, atol=1e-5)


def test_pixel_batches_cap_images_and_pixels():
    sizes = [(64, 64)] * 5 + [(200, 200)] + [(10, 10)] * 3
    batches = inference.pixel_batches(sizes, max_images=4, max_pixels=10_000)
    assert sorted(i for batch in batches for i in batch) == list(range(len(sizes)))
    for batch in batches:
        pixels = sum(w * h for w, h in (sizes[i] for i in batch))
        assert len(batch) <= 4 and (pixels <= 10_000 or len(batch) == 1), batch
    assert batches == [[0, 1], [2, 3], [4], [5], [6, 7, 8]]


def test_predict_scores_at_model_size_in_pixel_capped_batches(tmp_path, model, capsys, monkeypatch):
    monkeypatch.setattr(inference, "BATCH_PIXELS", 10_000)
    source = tmp_path / "images"
    sizes = {f"{i}.png": (64, 64) for i in range(5)} | {"5.png": (200, 200)}
    for name, size in sizes.items():
        picture(source / name, size)

    code, _, err = run(tmp_path, source, tmp_path / "out", capsys)

    assert code == 0, err
    assert [shape[0] for shape in model.batches] == [2, 2, 1, 1]
    assert all(shape[1:] == (3, MODEL_SIZE, MODEL_SIZE) for shape in model.batches)


def _traced_peak(draw) -> int:
    tracemalloc.start()
    try:
        draw()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_drawing_memory_does_not_grow_with_the_image(monkeypatch):
    """Overlay and mask of a 4 Mpx picture take no more working memory (numpy and Python, as traced)
    than those of a 0.25 Mpx one: only the three 8-bit pictures (input, overlay, mask; Pillow's own
    memory, 9 bytes a pixel) grow with the image. Drawing the whole map at once, as predict.py
    did, needs about 60 bytes a pixel of float arrays."""
    monkeypatch.setattr(engine.pictures, "TILE_PIXELS", 1 << 14)
    amap = np.random.default_rng(0).random((MODEL_SIZE, MODEL_SIZE)).astype(np.float32)
    small, large = Image.new("RGB", (500, 500), (90, 90, 90)), Image.new("RGB", (2000, 2000), (90, 90, 90))

    def draw(image: Image.Image) -> None:
        overlay, mask = overlay_and_mask(image, amap, 0.0, 0.5, draw_mask=True,
                                         tile_pixels=engine.pictures.TILE_PIXELS)
        assert overlay.size == mask.size == image.size

    draw(small)  # imports matplotlib's colour maps once, outside the measurement
    peak_small, peak_large = _traced_peak(lambda: draw(small)), _traced_peak(lambda: draw(large))
    assert peak_large < 1.5 * peak_small + (256 << 10), (peak_small, peak_large)
    # About 110 bytes per pixel of one tile (the colour map's float64 RGBA is most of it).
    assert peak_large < 200 * engine.pictures.TILE_PIXELS, (peak_large, "bounded by the tile, not the picture")


@pytest.mark.parametrize("args", [["checkpoint=~nosuchuser/best.pt", "input=x"], ["checkpoint=a.pt", "input=~nosuchuser/x"],
                                  ["checkpoint=a.pt", "input=x", "output=~nosuchuser/out"]])
def test_a_home_folder_that_does_not_exist_is_one_line(args):
    from utils.errors import UserError

    with pytest.raises(UserError, match="names no home folder here"):
        inference.parse_args(args)
