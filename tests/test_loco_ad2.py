"""MVTec LOCO AD and MVTec AD 2: their layouts, their metrics at the masks' resolution against the
definitions, the saved maps, the AD 2 submission, and both scripts end to end on fixtures."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from scipy import ndimage

from datasets.build import build_datasets
from datasets.images import load_mask_values
from datasets.layouts import loco_saturation_rules
from engine.benchmark_metrics import (ad2_metrics, full_resolution, loco_metrics, normal_pixel_threshold,
                                      truth_size)
from engine.cli import main
from engine.map_files import save_map, saved_map_path
from tests.fixtures import LOCO_DEFECTS, make_mvtec_ad2_folder, make_mvtec_loco_folder, tiny_run_args
from tests.test_region_curves import direct_area
from utils.errors import UserError
from utils.metrics import auroc

ROOT = Path(__file__).resolve().parent.parent


def run_args(dataset: str, category: str, root: Path, out: Path, *extra: str) -> list[str]:
    return [a.replace("data.dataset=mvtec", f"data.dataset={dataset}").replace("data.category=widget",
                                                                              f"data.category={category}")
            for a in tiny_run_args(root, out, *extra)]


# ------------------------------------------------------------------ layouts


def test_loco_uses_its_validation_folder_and_joins_each_images_masks(tmp_path):
    root = make_mvtec_loco_folder(tmp_path)
    splits = build_datasets("mvtec_loco", root, "juice_bottle", 32, 0.5, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 2, 6)  # nothing cut from train
    assert all("/validation/good/" in str(s.image) for s in splits.val.samples)
    assert splits.scoring == "loco"
    two = [s for s in splits.test.samples if len(s.masks) == 2]
    assert [s.defect for s in two] == ["logical_anomalies", "structural_anomalies"]
    item = splits.test[splits.test.samples.index(two[0])]
    union = np.zeros((32, 32), np.uint8)
    for mask in two[0].masks:
        union |= (np.array(Image.open(mask).resize((32, 32), Image.Resampling.NEAREST)) > 0).astype(np.uint8)
    assert torch.equal(item["mask"][0], torch.from_numpy(union).float())


def test_ad2_lists_its_private_images_apart(tmp_path):
    root = make_mvtec_ad2_folder(tmp_path)
    splits = build_datasets("mvtec_ad2", root, "vial", 32, 0.1, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 2, 4) and splits.scoring == "ad2"
    assert {split: len(images) for split, images in splits.unlabelled.items()} == {"test_private": 2,
                                                                                  "test_private_mixed": 2}
    assert [s.mask.name for s in splits.test.samples if s.label] == ["000_regular_mask.png", "001_regular_mask.png"]


def test_a_loco_category_without_defects_config_is_refused_by_name(tmp_path):
    root = make_mvtec_loco_folder(tmp_path)
    (root / "juice_bottle" / "defects_config.json").unlink()
    with pytest.raises(UserError, match=r"defects_config.json is missing"):
        build_datasets("mvtec_loco", root, "juice_bottle", 32, 0.1, seed=0)


def test_a_loco_mask_folder_without_its_image_is_refused_by_name(tmp_path):
    root = make_mvtec_loco_folder(tmp_path)
    (root / "juice_bottle" / "test" / "logical_anomalies" / "001.png").unlink()
    with pytest.raises(UserError, match=r"mask folder .*ground_truth/logical_anomalies/001 has no image"):
        build_datasets("mvtec_loco", root, "juice_bottle", 32, 0.1, seed=0)


def test_a_loco_mask_painted_with_an_unknown_value_is_refused_by_name(tmp_path):
    root = make_mvtec_loco_folder(tmp_path)
    splits = build_datasets("mvtec_loco", root, "juice_bottle", 32, 0.1, seed=0)
    bad = next(s for s in splits.test.samples if s.label).mask
    values = load_mask_values(bad)
    Image.fromarray(np.where(values > 0, 77, 0).astype(np.uint8)).save(bad)
    maps = torch.rand(len(splits.test), 32, 32)
    with pytest.raises(UserError, match=rf"mask {bad} is painted with pixel value\(s\) \[77\]"):
        loco_metrics(splits.test.samples, maps, torch.zeros_like(maps), maps.amax((1, 2)),
                     loco_saturation_rules(root, "juice_bottle"))


def test_loco_and_ad2_have_their_official_download_and_manual_steps():
    from datasets.download import DOWNLOADS, MANUAL_STEPS

    for name, archive in (("mvtec_loco", "mvtec_loco_anomaly_detection.tar.xz"), ("mvtec_ad2", "mvtec_ad_2.tar.gz")):
        info = DOWNLOADS[name]
        assert info.archive == archive and len(info.sha256) == 64 and info.urls[0].endswith(archive)
        assert archive in MANUAL_STEPS[name] and "<data.root>" in MANUAL_STEPS[name]


# ------------------------------------------------------------------ metrics against the definitions


def _loco_case(tmp_path):
    root = make_mvtec_loco_folder(tmp_path)
    splits = build_datasets("mvtec_loco", root, "juice_bottle", 32, 0.1, seed=0)
    samples = splits.test.samples
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(len(samples), 32, 32, generator=generator)
    for i, sample in enumerate(samples):  # defects score higher where their first mask lies
        if sample.label:
            small = Image.open(sample.mask).resize((32, 32), Image.Resampling.NEAREST)
            maps[i] += 0.6 * torch.from_numpy(np.array(small) > 0).float()
    masks = torch.stack([splits.test[i]["mask"][0] for i in range(len(samples))])
    return root, samples, maps, masks


def test_loco_metrics_are_the_definitions_at_the_masks_resolution(tmp_path):
    root, samples, maps, masks = _loco_case(tmp_path)
    scores = maps.amax((1, 2))
    got = loco_metrics(samples, maps, masks, scores, loco_saturation_rules(root, "juice_bottle"))
    rules = {d["pixel_value"]: d for d in LOCO_DEFECTS}
    labels = np.array([s.label for s in samples])
    for kind, folder in (("logical", "logical_anomalies"), ("structural", "structural_anomalies")):
        chosen = [i for i, s in enumerate(samples) if s.label == 0 or s.defect == folder]
        assert got[f"image_auroc_{kind}"] == auroc(scores.numpy()[chosen], labels[chosen])
        full, anomalous, regions = [], [], []
        for j, i in enumerate(chosen):
            sample = samples[i]
            full.append(full_resolution(maps[i], truth_size(sample)))
            inside = np.zeros(full[-1].shape, bool)
            for path in sample.masks:  # each mask file one defect, saturation as defects_config.json says
                values = load_mask_values(path)
                region = values > 0
                rule = rules[int(values.max())]
                area = int(region.sum())
                saturation = (int(rule["saturation_threshold"] * area) if rule["relative_saturation"]
                              else min(rule["saturation_threshold"], area))
                regions.append((j, region, float(saturation)))
                inside |= region
            anomalous.append(inside)
        for name, limit in (("05", 0.05), ("30", 0.3)):
            assert got[f"pixel_spro_{name}_{kind}"] == pytest.approx(direct_area(full, anomalous, regions, limit),
                                                                   abs=1e-3)
    assert got["image_auroc"] == pytest.approx((got["image_auroc_logical"] + got["image_auroc_structural"]) / 2)
    assert got["pixel_spro_05"] == pytest.approx((got["pixel_spro_05_logical"] + got["pixel_spro_05_structural"]) / 2)
    assert 0.5 < got["pixel_auroc"] <= 1 and 0 < got["pixel_spro_30"] <= 1


def test_ad2_metrics_are_the_definitions_at_the_masks_resolution(tmp_path):
    root = make_mvtec_ad2_folder(tmp_path)
    splits = build_datasets("mvtec_ad2", root, "vial", 32, 0.1, seed=0)
    samples = splits.test.samples
    maps = torch.rand(len(samples), 32, 32, generator=torch.Generator().manual_seed(1))
    masks = torch.stack([splits.test[i]["mask"][0] for i in range(len(samples))])
    maps += 0.5 * masks
    val_maps = torch.rand(len(splits.val), 32, 32, generator=torch.Generator().manual_seed(2))
    threshold = normal_pixel_threshold(splits.val.samples, val_maps, 3.0)
    val_full = np.concatenate([full_resolution(m, truth_size(s)).ravel() for m, s in zip(val_maps, splits.val.samples)])
    assert threshold == pytest.approx(val_full.mean() + 3 * val_full.std(), rel=1e-6)
    threshold = float(np.quantile(val_full, 0.9))  # one inside the maps' range, so F1 is not trivial
    got = ad2_metrics(samples, maps, masks, threshold)
    full = [full_resolution(m, truth_size(s)) for m, s in zip(maps, samples)]
    truth = [load_mask_values(s.mask) > 127 if s.mask else np.zeros(f.shape, bool) for s, f in zip(samples, full)]
    regions = []
    for i, inside in enumerate(truth):
        labelled, count = ndimage.label(inside, structure=np.ones((3, 3)))
        regions += [(i, labelled == k, float((labelled == k).sum())) for k in range(1, count + 1)]
    assert got["pixel_aupro_05"] == pytest.approx(direct_area(full, truth, regions, 0.05), abs=1e-3)
    scores, inside = np.concatenate([f.ravel() for f in full]), np.concatenate([t.ravel() for t in truth])
    tp, fp = np.sum((scores > threshold) & inside), np.sum((scores > threshold) & ~inside)
    fn = np.sum(inside) - tp
    assert got["pixel_segf1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    from sklearn.metrics import roc_auc_score

    assert got["pixel_auroc"] == pytest.approx(roc_auc_score(inside, scores), abs=1e-3)


def test_saved_maps_are_exactly_what_the_metrics_read(tmp_path):
    root, samples, maps, masks = _loco_case(tmp_path)
    seen = {}
    loco_metrics(samples, maps, masks, maps.amax((1, 2)), loco_saturation_rules(root, "juice_bottle"),
                 sink=lambda sample, values: (seen.__setitem__(sample.image, values),
                                              save_map(tmp_path / "run", sample, values)))
    assert len(seen) == len(samples)
    for sample in samples:
        saved = tifffile.imread(saved_map_path(tmp_path / "run", sample))
        assert saved.dtype == np.float32 and saved.shape == truth_size(sample) == (40, 56)
        assert np.array_equal(saved, seen[sample.image])


# ------------------------------------------------------------------ end to end (slow)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["trainRM_ST.py", "trainRM_RD.py"])
def test_both_scripts_train_and_score_loco_with_saved_maps(script, tmp_path):
    root = make_mvtec_loco_folder(tmp_path / "data")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, script, *run_args("mvtec_loco", "juice_bottle", root, out,
                                                               "eval.save_maps=true")],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "I-log" in result.stdout and "sPRO5" in result.stdout
    results_path = next(out.rglob("results.json"))
    results = json.loads(results_path.read_text())
    for key in ("image_auroc", "image_auroc_logical", "image_auroc_structural", "pixel_auroc", "pixel_spro_05",
                "pixel_spro_30", "pixel_spro_05_logical", "pixel_spro_30_structural"):
        assert 0 <= results[key] <= 1, key
    maps = sorted(p.relative_to(results_path.parent).as_posix() for p in results_path.parent.rglob("*.tiff"))
    assert maps == sorted(f"maps/{kind}/{i:03d}.tiff" for kind in ("good", "logical_anomalies",
                                                                   "structural_anomalies") for i in range(2))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["st", "rd"])
def test_ad2_trains_scores_and_writes_a_submission_predict_and_resume_work(method, tmp_path, capsys):
    root = make_mvtec_ad2_folder(tmp_path / "data")
    out, submission = tmp_path / "out", tmp_path / "submission"
    args = run_args("mvtec_ad2", "vial", root, out, f"eval.submission={submission}")
    assert main(method, args) == 0
    printed = capsys.readouterr().out
    assert "AUPRO5" in printed and "SegF1" in printed
    run = out / f"memkd-{method}" / "mvtec_ad2" / "vial"
    results = json.loads((run / "results.json").read_text())
    thresholds = json.loads((run / "evaluation.json").read_text())["thresholds"]
    assert results["seg_threshold"] == thresholds["seg_threshold"]
    assert 0 <= results["pixel_aupro_05"] <= 1 and 0 <= results["pixel_segf1"] <= 1
    for split in ("test_private", "test_private_mixed"):
        for image in sorted((root / "vial" / split).iterdir()):
            tiff = tifffile.imread(submission / "anomaly_images" / "vial" / split / f"{image.stem}.tiff")
            png = np.array(Image.open(submission / "anomaly_images_thresholded" / "vial" / split / f"{image.stem}.png"))
            height, width = Image.open(image).size[::-1]
            assert tiff.dtype == np.float16 and tiff.shape == png.shape == (height, width)
            assert png.dtype == np.uint8 and set(np.unique(png)) <= {0, 255}
            # The masks threshold the float32 maps; the TIFFs round them to float16 (3 decimal digits).
            threshold = thresholds["seg_threshold"]
            differ = (png == 255) != (tiff.astype(np.float64) > threshold)
            assert np.all(np.abs(tiff[differ].astype(np.float64) - threshold) <= 1e-3 * abs(threshold))
    assert main(method, args) == 0  # finished: reused, not retrained
    assert "reusing the finished run" in capsys.readouterr().out
    result = subprocess.run([sys.executable, "predict.py", f"checkpoint={run / 'best.pt'}",
                             f"input={root / 'vial' / 'test_private'}", f"output={tmp_path / 'predicted'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_submission_is_refused_for_other_datasets(tmp_path, capsys):
    root = make_mvtec_loco_folder(tmp_path / "data")
    assert main("st", run_args("mvtec_loco", "juice_bottle", root, tmp_path / "out",
                               f"eval.submission={tmp_path / 'sub'}")) == 0  # not read: data.dataset is not AD 2
    assert not (tmp_path / "sub").exists()


@pytest.mark.slow
def test_a_loco_sweep_runs_every_category_and_prints_the_mean_row(tmp_path, capsys):
    for category in ("breakfast_box", "juice_bottle", "pushpins", "screw_bag", "splicing_connectors"):
        make_mvtec_loco_folder(tmp_path / "data", category)
    args = run_args("mvtec_loco", "all", tmp_path / "data", tmp_path / "out")
    assert main("st", args) == 0
    printed = capsys.readouterr().out
    table = printed[printed.index("MemKD-ST on mvtec_loco"):]
    assert "I-log" in table and "I-str" in table and "\nmean " in table
    summary = json.loads((tmp_path / "out" / "memkd-st" / "mvtec_loco" / "summary.json").read_text())
    assert len(summary["categories"]) == 5 and "image_auroc_logical" in summary["mean"]


@pytest.mark.slow
def test_the_memory_ablation_and_export_work_on_loco(tmp_path):
    root = make_mvtec_loco_folder(tmp_path / "data")
    result = subprocess.run(
        [sys.executable, "benchmarks/memory_ablation.py", "--data-root", str(root), "--dataset-layout", "mvtec_loco",
         "--category", "juice_bottle", "--seeds", "0", "--students", "st", "--epochs", "1", "--out",
         str(tmp_path / "study"), "model.pretrained=false", "model.backbone=resnet18", "data.image_size=64",
         "data.num_workers=0", "memory.exemplars=2", "train.batch_size=4", "eval.max_pictures=0", "train.device=cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "study" / "ablation.md").is_file() and "juice_bottle" in result.stdout
    best = next((tmp_path / "study").rglob("best.pt"))
    exported = subprocess.run([sys.executable, "export.py", f"checkpoint={best}", f"output={tmp_path / 'loco.onnx'}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert (tmp_path / "loco.onnx").is_file()


def test_non_finite_maps_stop_evaluation_before_any_metric(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import engine.evaluation as evaluation
    from engine.config import load_config

    root = make_mvtec_loco_folder(tmp_path)
    splits = build_datasets("mvtec_loco", root, "juice_bottle", 32, 0.1, seed=0)
    nan_maps = torch.full((len(splits.test), 32, 32), float("nan"))
    monkeypatch.setattr(evaluation, "anomaly_maps", lambda *args, **kwargs: {
        "maps": nan_maps, "masks": torch.zeros_like(nan_maps), "labels": torch.zeros(len(nan_maps), dtype=torch.long),
        "has_mask": torch.ones(len(nan_maps), dtype=torch.bool)})
    run = SimpleNamespace(settings=load_config("st", ["data.dataset=mvtec_loco", f"data.root={root}"]),
                          device=torch.device("cpu"), folder=tmp_path / "run", category="juice_bottle")
    with pytest.raises(UserError, match="gives non-finite anomaly maps"):
        evaluation.evaluate(None, splits, run)
