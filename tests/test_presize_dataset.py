"""benchmarks/presize_dataset.py: a pre-resized copy loads exactly as the full-size dataset does."""
import torch
from PIL import Image

from benchmarks.presize_dataset import main
from datasets.build import build_datasets
from tests.fixtures import make_mvtec_folder


def test_a_run_reads_the_same_pixels_and_masks_from_the_presized_copy(tmp_path, capsys):
    source = make_mvtec_folder(tmp_path / "full", size=64)
    (source / "widget" / "license.txt").write_text("terms")
    assert main([str(source), str(tmp_path / "small"), "--size", "24"]) == 0
    assert "wrote 14 images and 3 masks at 24 px" in capsys.readouterr().out
    with Image.open(tmp_path / "small" / "widget" / "train" / "good" / "000.png") as img:
        assert img.size == (24, 24)
    assert (tmp_path / "small" / "widget" / "license.txt").read_text() == "terms"
    full = build_datasets("mvtec", source, "widget", image_size=24, val_fraction=0.25, seed=0)
    small = build_datasets("mvtec", tmp_path / "small", "widget", image_size=24, val_fraction=0.25, seed=0)
    for split in ("train", "val", "test"):
        a, b = getattr(full, split), getattr(small, split)
        assert len(a) == len(b) > 0
        for i in range(len(a)):
            assert torch.equal(a[i]["image"], b[i]["image"]) and torch.equal(a[i]["mask"], b[i]["mask"])
            assert a[i]["label"] == b[i]["label"]


def test_lossy_images_and_a_copy_inside_the_dataset_are_refused(tmp_path, capsys):
    source = make_mvtec_folder(tmp_path / "full")
    assert main([str(source), str(source / "small"), "--size", "16"]) == 2
    assert "must lie outside the dataset" in capsys.readouterr().err
    Image.new("RGB", (32, 32)).save(source / "widget" / "train" / "good" / "photo.jpg")
    assert main([str(source), str(tmp_path / "small"), "--size", "16"]) == 2
    assert "photo.jpg is a .jpg image: re-encoding it would change its pixels" in capsys.readouterr().err


def test_missing_arguments_are_a_one_line_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "usage: python benchmarks/presize_dataset.py SOURCE TARGET --size 128" in capsys.readouterr().err


def test_a_target_that_holds_files_or_the_dataset_is_refused_and_a_failure_leaves_no_copy(tmp_path, capsys):
    source = make_mvtec_folder(tmp_path / "data" / "full")
    stale = tmp_path / "stale"
    (stale / "widget").mkdir(parents=True)
    (stale / "widget" / "old.png").write_bytes(b"x")
    assert main([str(source), str(stale), "--size", "16"]) == 2
    assert "already exists and is not an empty folder" in capsys.readouterr().err
    assert main([str(source), str(tmp_path / "data"), "--size", "16"]) == 2  # a parent of the source
    assert "must lie outside the dataset" in capsys.readouterr().err
    Image.new("RGB", (32, 32)).save(source / "widget" / "train" / "good" / "zz_photo.jpg")  # fails late
    assert main([str(source), str(tmp_path / "small"), "--size", "16"]) == 2
    capsys.readouterr()
    assert not (tmp_path / "small").exists() and not list(tmp_path.glob(".small.*"))
