"""The generated demo dataset: complete, deterministic, exact masks, atomic generation."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import datasets.demo as demo
from datasets.build import build_datasets, list_categories
from utils.errors import UserError


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_is_complete(demo_root):
    assert demo.is_complete(demo_root)
    assert (demo_root / demo.MARKER).read_text() == f"memkd-demo {demo.DEMO_VERSION}\n"
    assert list_categories("demo", demo_root) == ["brick", "gravel", "grass"]
    for cat in demo.DEMO_CATEGORIES:
        c = demo_root / cat
        assert len(list((c / "train" / "good").glob("*.png"))) == 48
        assert len(list((c / "test" / "good").glob("*.png"))) == 12
        for kind in demo.DEFECT_TYPES:
            images = sorted((c / "test" / kind).glob("*.png"))
            assert len(images) == 4
            for img in images:
                mask = np.asarray(Image.open(c / "ground_truth" / kind / f"{img.stem}_mask.png"))
                assert mask.shape == (128, 128) and set(np.unique(mask)) == {0, 255}
                assert 0.01 <= (mask > 0).mean() <= 0.08
                rgb = Image.open(img)
                assert rgb.mode == "RGB" and rgb.size == (128, 128)


def test_demo_regenerates_byte_identical(tmp_path, demo_root):
    demo.generate(tmp_path / "again")
    assert digest(tmp_path / "again") == digest(demo_root)
    assert len(digest(demo_root)) == 3 * (48 + 12 + 16 + 16) + 1


def test_categories_differ_and_images_are_not_copies(demo_root):
    files = digest(demo_root)
    assert len(set(files.values())) == len(files)  # no two files are identical
    means = [np.asarray(Image.open(demo_root / c / "train/good/000.png")).reshape(-1, 3).mean(0) for c in demo.DEMO_CATEGORIES]
    assert np.abs(means[0] - means[2]).max() > 20  # tinted: brick is red-brown, grass green


@pytest.mark.parametrize("kind", demo.DEFECT_TYPES)
def test_defects_change_exactly_the_masked_pixels(kind):
    rng = np.random.default_rng(0)
    src, other = demo.texture("gravel"), demo.texture("grass")
    for _ in range(5):
        clean, foreign = demo.random_view(src, rng), demo.random_view(other, rng)
        out, mask = demo.make_defect(kind, clean, rng, foreign)
        changed = (out != clean).any(-1)
        assert not (changed & ~mask).any(), "a pixel outside the mask changed"
        assert changed[mask].mean() > 0.8, "the mask is much larger than the defect"
        assert demo.MIN_AREA <= mask.mean() <= demo.MAX_AREA
        diff = np.abs(out.astype(int) - clean.astype(int)).max(-1)[mask].mean()
        assert diff > 25, f"{kind} defect is hardly visible (mean change {diff:.1f})"


def test_build_datasets_on_demo(demo_root):
    s = build_datasets("demo", demo_root, "grass", 64, 0.25, seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (36, 12, 28)
    labels = s.test.labels
    assert labels.count(0) == 12 and labels.count(1) == 16
    item = s.test[labels.index(1)]
    assert item["has_mask"] and item["mask"].sum() > 0 and item["image"].shape == (3, 64, 64)


def test_interrupted_generation_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    root = tmp_path / "demo"
    real = demo._write_category

    def failing(out, index, category):
        if index == 1:
            raise KeyboardInterrupt
        real(out, index, category)

    monkeypatch.setattr(demo, "_write_category", failing)
    with pytest.raises(KeyboardInterrupt):
        demo.ensure_demo_dataset(root)
    assert not root.exists() and list(tmp_path.iterdir()) == []  # the partial folder is removed
    monkeypatch.setattr(demo, "_write_category", real)
    assert demo.ensure_demo_dataset(root) == root and demo.is_complete(root)


def test_generation_into_existing_empty_folder_and_stale_version(tmp_path):
    root = tmp_path / "demo"
    root.mkdir()
    demo.ensure_demo_dataset(root)
    assert demo.is_complete(root)
    (root / demo.MARKER).write_text("memkd-demo 0\n")  # an older version is replaced
    (root / "brick" / "extra.png").write_bytes(b"x")
    demo.ensure_demo_dataset(root)
    assert demo.is_complete(root) and not (root / "brick" / "extra.png").exists()


def test_foreign_non_empty_folder_is_left_alone(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty and holds no demo dataset"):
        demo.ensure_demo_dataset(root)
    assert (root / "notes.txt").read_text() == "keep me"
