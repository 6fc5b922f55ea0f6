"""Dataset loaders: image modes, masks, every layout, the seeded split, caching and errors."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import datasets.build
from datasets.build import build_datasets, list_categories
from datasets.images import IMAGENET_MEAN, IMAGENET_STD, image_to_tensor, load_rgb
from datasets.registry import DATASET_NAMES
from datasets.images import load_mask
from tests.fixtures import (
    defective, make_btad_folder, make_eyecandies_folder, make_mvtec3d_folder, make_mvtec_folder, make_user_folder,
    make_visa_folder, save, texture,
)
from utils.errors import UserError

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def pixels(item: dict) -> torch.Tensor:
    """An item's image back in 0..255 units."""
    return (item["image"] * STD + MEAN) * 255


def assert_pairing(item: dict) -> None:
    """The fixtures paint each defect as a 255 rectangle exactly where its mask is."""
    mask = item["mask"][0].bool()
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert mask.any(), item["path"]
    grey = pixels(item).mean(0)
    assert grey[mask].mean() > 230, f"mask of {item['path']} is not over its defect"
    assert grey[~mask].mean() < 200


def all_items(ds) -> list[dict]:
    return [ds[i] for i in range(len(ds))]


# ---------------------------------------------------------------- images and masks


@pytest.mark.parametrize(
    "mode, make, suffix, expected",
    [
        ("L", lambda: Image.new("L", (4, 4), 77), ".png", (77, 77, 77)),
        ("1", lambda: Image.new("1", (4, 4), 1), ".png", (255, 255, 255)),
        ("RGBA half alpha", lambda: Image.new("RGBA", (4, 4), (200, 100, 50, 128)), ".png", (100, 50, 25)),
        ("RGBA transparent", lambda: Image.new("RGBA", (4, 4), (200, 100, 50, 0)), ".png", (0, 0, 0)),
        ("LA", lambda: Image.new("LA", (4, 4), (200, 255)), ".png", (200, 200, 200)),
        ("P", lambda: Image.new("RGB", (4, 4), (10, 120, 230)).convert("P", palette=Image.Palette.ADAPTIVE), ".png",
         (10, 120, 230)),
        ("CMYK", lambda: Image.new("CMYK", (4, 4), (0, 0, 0, 0)), ".tif", (255, 255, 255)),
        ("I;16", lambda: Image.fromarray(np.full((4, 4), 257 * 200, np.uint16)), ".png", (200, 200, 200)),
        ("I", lambda: Image.fromarray(np.full((4, 4), 257 * 60, np.int32)), ".tif", (60, 60, 60)),
        ("F", lambda: Image.fromarray(np.full((4, 4), 0.5, np.float32)), ".tif", (128, 128, 128)),
    ],
)
def test_load_rgb_converts_every_mode(tmp_path, mode, make, suffix, expected):
    path = tmp_path / f"img{suffix}"
    make().save(path)
    img = load_rgb(path)
    assert img.mode == "RGB" and img.size == (4, 4)
    assert tuple(np.asarray(img)[1, 1].tolist()) == pytest.approx(expected, abs=1)


def test_load_rgb_scales_16_bit_without_clipping(tmp_path):
    ramp = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16).repeat(2, 0)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    got = np.asarray(load_rgb(tmp_path / "ramp.png"))[0, :, 0]
    assert got.tolist() == [0, 64, 128, 255]


def test_image_to_tensor_resizes_and_normalises():
    img = Image.new("RGB", (40, 24), (255, 0, 128))
    x = image_to_tensor(img, 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    expected = (torch.tensor([255.0, 0.0, 128.0]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(x[:, 5, 5], expected, atol=1e-5)
    # Any mode is accepted.
    assert image_to_tensor(Image.new("L", (9, 9), 3), 8).shape == (3, 8, 8)


def test_image_to_tensor_is_antialiased():
    checker = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    x = image_to_tensor(Image.fromarray(checker), 8) * STD + MEAN
    # A 1-px checkerboard shrunk 8x must average out to mid grey, not alias to black/white.
    assert (x - 0.5).abs().max() < 0.1


def test_load_mask_binarises_each_kind(tmp_path):
    grey = np.zeros((32, 32), np.uint8)
    grey[:16] = 100  # below the 8-bit threshold: background
    grey[:, :8] = 255
    save(grey, tmp_path / "m8.png")
    m = load_mask(tmp_path / "m8.png", 16)
    assert m.dtype == np.uint8 and set(np.unique(m)) == {0, 1}
    assert m[:, :4].all() and not m[:, 4:].any()
    assert load_mask(tmp_path / "m8.png", 16, nonzero=True)[:8].all()  # VisA rule: > 0

    Image.fromarray(grey > 200).save(tmp_path / "m1.png")  # 1-bit
    assert (load_mask(tmp_path / "m1.png", 16) == m).all()

    Image.fromarray((grey > 200).astype(np.uint16)).save(tmp_path / "m16.png")  # 16-bit with 0/1
    assert Image.open(tmp_path / "m16.png").mode.startswith("I")
    assert (load_mask(tmp_path / "m16.png", 16) == m).all()

    odd = np.zeros((30, 50), np.uint8)
    odd[7:23, 11:37] = 255
    save(odd, tmp_path / "odd.png")
    r = load_mask(tmp_path / "odd.png", 24)
    assert r.shape == (24, 24) and set(np.unique(r)) == {0, 1}


# ---------------------------------------------------------------- layouts


def test_mvtec_counts_labels_and_mask_pairing(mvtec_root):
    s = build_datasets("mvtec", mvtec_root, "widget", 32, 0.25, seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (6, 2, 6)
    test = all_items(s.test)
    assert sorted(it["label"] for it in test) == [0, 0, 0, 1, 1, 1]
    assert {it["defect"] for it in test if it["label"]} == {"scratch", "dent"}
    for it in test:
        assert it["image"].shape == (3, 32, 32) and it["image"].dtype == torch.float32
        assert it["mask"].shape == (1, 32, 32) and it["mask"].dtype == torch.float32
        assert it["has_mask"] is True
        if it["label"]:
            assert_pairing(it)
        else:
            assert it["mask"].sum() == 0
    for it in all_items(s.train) + all_items(s.val):
        assert it["label"] == 0 and it["mask"].sum() == 0 and "/train/good/" in it["path"]


def test_mpdd_uses_mvtec_layout(tmp_path):
    root = make_mvtec_folder(tmp_path, "tubes")
    s = build_datasets("mpdd", root, "tubes", 32, 0.0, seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (8, 0, 6)


@pytest.mark.parametrize("image_ext, mask_ext", [(".bmp", ".png"), (".png", ".bmp")])
def test_btad(tmp_path, image_ext, mask_ext):
    root = make_btad_folder(tmp_path, "02", image_ext=image_ext, mask_ext=mask_ext)
    s = build_datasets("btad", root, "02", 24, 0.2, seed=1)
    assert (len(s.train), len(s.val), len(s.test)) == (5, 1, 4)
    test = all_items(s.test)
    assert [it["label"] for it in test] == [0, 0, 1, 1]
    for it, sample in zip(test[2:], s.test.samples[2:]):
        assert_pairing(it)
        assert sample.mask.suffix == mask_ext and sample.mask.stem == sample.image.stem


def test_mvtec3d_uses_rgb_only_and_its_official_validation_folder(tmp_path):
    root = make_mvtec3d_folder(tmp_path)
    s = build_datasets("mvtec3d", root, "bagel", 24, 0.2, seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (6, 2, 4)  # nothing is cut from train
    paths = [it["path"] for ds in (s.train, s.val, s.test) for it in all_items(ds)]
    assert all("/rgb/" in p for p in paths)
    assert all("/validation/good/" in it["path"] for it in all_items(s.val))
    test = all_items(s.test)
    assert sorted(it["label"] for it in test) == [0, 0, 1, 1]
    for it in test:
        if it["label"]:
            assert_pairing(it)


def test_eyecandies_reads_metadata_and_image_0(tmp_path):
    root = make_eyecandies_folder(tmp_path, "GummyBear", n_good_test=3, n_defect=2)
    s = build_datasets("eyecandies", root, "GummyBear", 24, 0.2, seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (6, 1, 5)  # val/ is the validation slice
    test = all_items(s.test)
    assert [it["label"] for it in test] == [0, 0, 0, 1, 1]
    assert all(it["path"].endswith("_image_0.png") and "/test_public/" in it["path"] for it in test)
    for it in test[3:]:
        assert_pairing(it)  # also proves image_0 was read: the other lights are inverted
    assert all("/train/" in it["path"] for it in all_items(s.train))
    assert all("/val/data/" in it["path"] for it in all_items(s.val))


def test_visa_follows_the_csv_split_and_binary_01_masks(tmp_path):
    root = make_visa_folder(tmp_path, ("candle", "pcb1"), n_train=6, n_good_test=2, n_defect=3)
    s = build_datasets("visa", root, "pcb1", 24, 0.2, seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (5, 1, 5)
    paths = [it["path"] for ds in (s.train, s.val, s.test) for it in all_items(ds)]
    assert all("/pcb1/" in p for p in paths)
    test = all_items(s.test)
    assert [it["label"] for it in test] == [0, 0, 1, 1, 1]
    for it in test[2:]:
        assert_pairing(it)  # masks hold 0/1 values: a > 127 threshold would make them empty


def test_folder_layout_holds_out_test_good_and_marks_missing_masks(tmp_path):
    root = make_user_folder(tmp_path, n_good=10, defects={"crack": 2, "spot": 3}, masked=("crack",), mask_suffix="_mask")
    assert list_categories("folder", root) == ["parts"]
    s = build_datasets("folder", root, "parts", 24, 0.25, seed=3)
    assert (len(s.train), len(s.val)) == (6, 2)  # 10 good: 2 held out for test, 8 split 6/2
    test = all_items(s.test)
    assert len(test) == 2 + 5
    goods = [it for it in test if it["label"] == 0]
    assert len(goods) == 2 and all(it["has_mask"] for it in goods)
    cracks = [it for it in test if it["defect"] == "crack"]
    spots = [it for it in test if it["defect"] == "spot"]
    assert len(cracks) == 2 and all(it["has_mask"] for it in cracks)
    for it in cracks:
        assert_pairing(it)
    assert len(spots) == 3 and not any(it["has_mask"] for it in spots)
    assert all(it["mask"].sum() == 0 for it in spots)
    used = {it["path"] for ds in (s.train, s.val, s.test) for it in all_items(ds)}
    assert len(used) == 10 + 5  # every image used exactly once
    again = build_datasets("folder", root, "parts", 24, 0.25, seed=3)
    assert [x.image for x in again.test.samples] == [x.image for x in s.test.samples]
    other = build_datasets("folder", root, "parts", 24, 0.25, seed=4)
    held_out = lambda splits: {x.image for x in splits.test.samples if x.label == 0}  # noqa: E731
    assert held_out(other) != held_out(s)


def test_folder_layout_with_test_good_and_no_defects(tmp_path):
    root = make_user_folder(tmp_path, n_good=6, defects={}, n_test_good=3)
    s = build_datasets("folder", root, "parts", 24, 0.0, seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (6, 0, 3)
    assert all(it["label"] == 0 and "/test/good/" in it["path"] for it in all_items(s.test))


def test_folder_layout_reads_test_defect_folders_and_plain_stem_masks(tmp_path):
    root = make_user_folder(tmp_path, n_good=5, defects={"dent": 2}, masked=("dent",))
    cat = root / "parts"
    (cat / "test").mkdir()
    (cat / "dent").rename(cat / "test" / "dent")
    s = build_datasets("folder", root, "parts", 24, 0.0, seed=0)
    anomalies = [it for it in all_items(s.test) if it["label"]]
    assert len(anomalies) == 2
    for it in anomalies:
        assert it["has_mask"] and "/test/dent/" in it["path"]
        assert_pairing(it)


# ---------------------------------------------------------------- split


def test_split_is_seeded_disjoint_and_never_touches_test(tmp_path):
    root = make_mvtec_folder(tmp_path, n_train=20)
    a = build_datasets("mvtec", root, "widget", 16, 0.3, seed=7)
    b = build_datasets("mvtec", root, "widget", 16, 0.3, seed=7)
    c = build_datasets("mvtec", root, "widget", 16, 0.3, seed=8)
    names = lambda ds: [x.image for x in ds.samples]  # noqa: E731
    assert names(a.train) == names(b.train) and names(a.val) == names(b.val)
    assert set(names(a.val)) != set(names(c.val))
    assert len(a.val) == 6 and len(a.train) == 14
    assert not set(names(a.train)) & set(names(a.val))
    assert set(names(a.train)) | set(names(a.val)) == set((root / "widget" / "train" / "good").glob("*.png"))
    assert not (set(names(a.train)) | set(names(a.val))) & set(names(a.test))


@pytest.mark.parametrize("n_train, fraction, n_val", [(8, 0.0, 0), (8, 0.01, 1), (8, 0.99, 7), (1, 0.5, 0), (2, 0.1, 1)])
def test_val_size_rules(tmp_path, n_train, fraction, n_val):
    root = make_mvtec_folder(tmp_path, n_train=n_train, size=16)
    s = build_datasets("mvtec", root, "widget", 16, fraction, seed=0)
    assert (len(s.train), len(s.val)) == (n_train - n_val, n_val)


# ---------------------------------------------------------------- modes, sizes, caching


def test_mixed_modes_and_sizes_in_one_dataset(tmp_path):
    root = make_mvtec_folder(tmp_path, n_train=4, n_defect=2)
    cat = root / "widget"
    rng = np.random.default_rng(9)
    train = sorted((cat / "train" / "good").glob("*.png"))
    Image.fromarray(texture(rng, (30, 50))[..., 0]).save(train[0])  # L, non-square
    Image.fromarray(texture(rng, 70)).convert("RGBA").save(train[1])
    Image.fromarray(texture(rng, 64)).convert("P").save(train[2])
    Image.fromarray(texture(rng, 40)[..., 0].astype(np.uint16) * 257).save(train[3])  # I;16
    img, mask = defective(rng, (48, 80))
    save(img, cat / "test" / "scratch" / "000.png")
    Image.fromarray(mask > 0).save(cat / "ground_truth" / "scratch" / "000_mask.png")  # 1-bit mask
    s = build_datasets("mvtec", root, "widget", 32, 0.0, seed=0)
    for it in all_items(s.train):
        assert it["image"].shape == (3, 32, 32) and torch.isfinite(it["image"]).all()
    i16 = s.train[3]["image"]
    assert 30 < pixels({"image": i16}).mean() < 200  # scaled, not clipped to 255 or crushed to 0
    scratch = [it for it in all_items(s.test) if it["path"].endswith("scratch/000.png")][0]
    assert_pairing(scratch)


def test_items_are_cached_after_first_load(mvtec_root):
    s = build_datasets("mvtec", mvtec_root, "widget", 16, 0.0, seed=0)
    first = s.test[3]
    Path(first["path"]).unlink()
    second = s.test[3]
    assert torch.equal(first["image"], second["image"]) and torch.equal(first["mask"], second["mask"])
    second["image"].add_(1)  # callers may modify their tensors without corrupting the cache
    assert torch.equal(s.test[3]["image"], first["image"])


def test_dataloader_workers_give_identical_batches(mvtec_root):
    s = build_datasets("mvtec", mvtec_root, "widget", 16, 0.0, seed=0)
    plain = list(DataLoader(s.test, batch_size=3, num_workers=0))
    parallel = list(DataLoader(s.test, batch_size=3, num_workers=2))
    for a, b in zip(plain, parallel, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert torch.equal(a["label"], b["label"]) and a["path"] == b["path"]
        assert a["has_mask"].tolist() == b["has_mask"].tolist()


# ---------------------------------------------------------------- categories and errors


def test_list_categories():
    counts = {"mvtec": 15, "visa": 12, "mpdd": 6, "mvtec3d": 10, "eyecandies": 10, "btad": 3, "mvtec_loco": 5, "mvtec_ad2": 8,
              "demo": 3}
    for name, n in counts.items():
        assert len(list_categories(name, "/nonexistent")) == n
    assert "bottle" in list_categories("mvtec", "x") and "pipe_fryum" in list_categories("visa", "x")
    assert list_categories("btad", "x") == ["01", "02", "03"]
    assert set(DATASET_NAMES) == set(counts) | {"folder"}


def raises(match: str):
    return pytest.raises(UserError, match=match)


def test_unknown_dataset_and_category(tmp_path, mvtec_root):
    with raises("unknown dataset 'kitti'.*mvtec, visa"):
        build_datasets("kitti", tmp_path, "x", 32, 0.1, 0)
    with raises("unknown MVTec AD category 'bottel'.*bottle.*widget"):
        build_datasets("mvtec", mvtec_root, "bottel", 32, 0.1, 0)
    with raises("unknown demo category 'wood'.*brick"):
        build_datasets("demo", tmp_path / "demo", "wood", 32, 0.1, 0)
    root = make_user_folder(tmp_path / "user")
    with raises("category 'bolts' not found.*available: parts"):
        build_datasets("folder", root, "bolts", 32, 0.1, 0)


def test_missing_data_says_where_to_get_it(tmp_path):
    with raises(r"MVTec AD data not found: .*bottle does not exist.*mvtec\.com.*train/good"):
        build_datasets("mvtec", tmp_path / "nowhere", "bottle", 32, 0.1, 0)
    with raises(r"VisA data not found: .*1cls\.csv does not exist.*spot-diff"):
        build_datasets("visa", tmp_path, "candle", 32, 0.1, 0)


def test_download_is_called_only_when_asked(tmp_path, monkeypatch):
    calls = []

    def ensure_downloaded(dataset, root):
        calls.append((dataset, Path(root)))
        make_mvtec_folder(root, "bottle")

    monkeypatch.setattr(datasets.build, "ensure_downloaded", ensure_downloaded)
    with raises("data not found"):
        build_datasets("mvtec", tmp_path / "a", "bottle", 16, 0.1, 0)
    assert calls == []
    s = build_datasets("mvtec", tmp_path / "a", "bottle", 16, 0.1, 0, download=True)
    assert calls == [("mvtec", tmp_path / "a")] and len(s.test) == 6


def test_missing_mask_names_image_and_expected_path(mvtec_root):
    (mvtec_root / "widget" / "ground_truth" / "dent" / "001_mask.png").unlink()
    with raises(r"test/dent/001\.png has no ground-truth mask \(expected .*ground_truth/dent/001_mask\.png\)"):
        build_datasets("mvtec", mvtec_root, "widget", 16, 0.1, 0)


def test_missing_masks_in_other_layouts(tmp_path):
    b = make_btad_folder(tmp_path / "b")
    next((b / "01" / "ground_truth" / "ko").iterdir()).unlink()
    with raises("has no ground-truth mask"):
        build_datasets("btad", b, "01", 16, 0.1, 0)
    e = make_eyecandies_folder(tmp_path / "e")
    (e / "CandyCane" / "test_public" / "data" / "003_mask.png").unlink()
    with raises(r"003_image_0\.png has no ground-truth mask"):
        build_datasets("eyecandies", e, "CandyCane", 16, 0.1, 0)
    (e / "CandyCane" / "test_public" / "data" / "000_metadata.yaml").unlink()
    with raises(r"000_metadata\.yaml is missing"):
        build_datasets("eyecandies", e, "CandyCane", 16, 0.1, 0)
    v = make_visa_folder(tmp_path / "v", ("candle",))
    next((v / "candle" / "Data" / "Masks" / "Anomaly").iterdir()).unlink()
    with raises("has no ground-truth mask"):
        build_datasets("visa", v, "candle", 16, 0.1, 0)
    m = make_mvtec3d_folder(tmp_path / "m")
    (m / "bagel" / "test" / "crack" / "gt" / "000.png").unlink()
    with raises(r"crack/rgb/000\.png has no ground-truth mask"):
        build_datasets("mvtec3d", m, "bagel", 16, 0.1, 0)


@pytest.mark.parametrize("content", [b"", b"this is not an image at all"])
def test_unreadable_image_is_named(mvtec_root, content):
    bad = mvtec_root / "widget" / "train" / "good" / "004.png"
    bad.write_bytes(content)
    with raises(r"train/good/004\.png"):
        build_datasets("mvtec", mvtec_root, "widget", 16, 0.1, 0)


def test_truncated_image_fails_on_load_naming_the_file(mvtec_root):
    bad = mvtec_root / "widget" / "test" / "good" / "001.png"
    bad.write_bytes(bad.read_bytes()[:80])  # valid header, pixel data cut short
    s = build_datasets("mvtec", mvtec_root, "widget", 16, 0.0, 0)
    index = [str(x.image) for x in s.test.samples].index(str(bad))
    with raises(r"cannot read image .*test/good/001\.png"):
        s.test[index]


def test_empty_or_missing_folders(tmp_path, mvtec_root):
    for p in (mvtec_root / "widget" / "train" / "good").iterdir():
        p.unlink()
    with raises(r"train folder .*train/good is empty"):
        build_datasets("mvtec", mvtec_root, "widget", 16, 0.1, 0)
    root = make_mvtec_folder(tmp_path / "t")
    shutil.rmtree(root / "widget" / "test")
    with raises("no test images"):
        build_datasets("mvtec", root, "widget", 16, 0.1, 0)
    user = make_user_folder(tmp_path / "u")
    for p in (user / "parts" / "good").iterdir():
        p.unlink()
    with raises(r"good holds no images"):
        build_datasets("folder", user, "parts", 16, 0.1, 0)
    with raises("no categories under"):
        list_categories("folder", tmp_path / "empty")


def test_bad_arguments(mvtec_root):
    with raises("val_fraction"):
        build_datasets("mvtec", mvtec_root, "widget", 16, 1.0, 0)
