"""What a finished run leaves for people: thresholds in best.pt, predict.py, pictures, summary tables."""
import contextlib
import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import engine.inference as inference
from tests.fixtures import make_mvtec_folder, tiny_run_args, texture
from engine.cli import main
from engine.report import COLUMNS, PAPER_MEANS, write_summary
from engine.thresholds import THRESHOLD_KEYS
from engine.pictures import CELL_PIXELS, GAP_PIXELS, choose_examples, example_cells, outline

ROOT = Path(__file__).resolve().parent.parent


def run_args(data_root: Path, out: Path, *extra: str) -> list[str]:
    return tiny_run_args(data_root, out, "eval.max_pictures=4", *extra, pictures=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished MemKD-ST run (1 epoch, 64 px): (data root, output dir, run dir, printed output)."""
    base = tmp_path_factory.mktemp("evaluation")
    data_root = make_mvtec_folder(base / "data", "widget", n_train=8, n_good_test=3, n_defect=3)
    out = base / "results"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main("st", run_args(data_root, out)) == 0
    return data_root, out, out / "memkd-st" / "mvtec" / "widget", printed.getvalue()


# --------------------------------------------------------------------------- thresholds


@pytest.mark.slow
def test_thresholds_are_stored_beside_best_pt_and_in_results_json(trained):
    _, _, run_dir, _ = trained
    best = torch.load(run_dir / "best.pt", weights_only=True)
    results = json.loads((run_dir / "results.json").read_text())
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    thresholds = evaluation["thresholds"]
    assert set(thresholds) == set(THRESHOLD_KEYS)
    for key in ("normal_threshold", "image_f1_threshold", "pixel_f1_threshold"):
        assert isinstance(thresholds[key], float) and thresholds[key] == results[key], key
    # The F1 thresholds are values of the test maps, so the colour scale's bottom lies below them.
    assert thresholds["map_low"] <= thresholds["pixel_f1_threshold"] <= thresholds["image_f1_threshold"]
    # Evaluation decides outside the checkpoints: it records which weights and scoring it used.
    assert evaluation["checkpoint"] == "best.pt" and evaluation["student_digest"] == best["student_digest"]
    assert evaluation["scoring"] == {"eval.combine": "product", "eval.sigma": 0.0, "eval.save_maps": False}
    assert "thresholds" not in best and "thresholds" not in torch.load(run_dir / "last.pt", weights_only=True)


# --------------------------------------------------------------------------- pictures


@pytest.mark.slow
def test_pictures_are_drawn_at_screen_resolution(trained):
    _, _, run_dir, _ = trained
    with Image.open(run_dir / "examples.png") as examples, Image.open(run_dir / "roc.png") as roc:
        assert examples.format == roc.format == "PNG"
        # 4 rows and 4 columns of CELL_PIXELS pictures, plus labels: exactly eval.max_pictures rows.
        assert examples.height == 30 + 4 * CELL_PIXELS + 3 * GAP_PIXELS + 5
        assert examples.width == 140 + 4 * CELL_PIXELS + 3 * GAP_PIXELS + 5
        assert roc.size == (800, 400)


@pytest.mark.slow
def test_max_pictures_zero_draws_nothing_and_removes_old_pictures(trained, tmp_path):
    data_root, out, _, _ = trained
    copy = tmp_path / "results"
    shutil.copytree(out, copy)
    run_dir = copy / "memkd-st" / "mvtec" / "widget"
    assert (run_dir / "examples.png").is_file()
    assert main("st", run_args(data_root, copy, "phase=test", "eval.max_pictures=0")) == 0
    assert not (run_dir / "examples.png").exists() and not (run_dir / "roc.png").exists()
    assert json.loads((run_dir / "results.json").read_text())["picture_seconds"] < 0.5


def test_examples_are_the_best_and_worst_cases():
    scores = np.array([0.9, 0.1, 0.5, 0.8, 0.3, 0.7, 0.2])
    labels = np.array([1, 1, 1, 0, 0, 0, 1], dtype=bool)
    picks = choose_examples(scores, labels, 5)
    assert picks == [(0, "anomaly, high score"), (2, "anomaly, high score"), (1, "anomaly, low score"),
                     (6, "anomaly, low score"), (3, "normal, high score")]
    # Fewer images than rows: each once, nothing invented.
    assert sorted(i for i, _ in choose_examples(scores, labels, 50)) == list(range(7))
    assert [why for _, why in choose_examples(scores, np.zeros(7, bool), 2)] == ["normal, high score"] * 2


def test_example_row_shows_the_mask_at_the_threshold_and_the_ground_truth_outline():
    rgb = np.full((16, 16, 3), 100, np.uint8)
    amap = np.zeros((16, 16), np.float32)
    amap[2:6, 2:6] = 1.0
    truth = np.zeros((16, 16), bool)
    truth[8:14, 8:14] = True
    original, overlay, gt, predicted = example_cells(rgb, amap, truth, low=0.0, threshold=0.5)
    assert (original == rgb).all() and overlay.shape == (16, 16, 3) and not (overlay == rgb).all()
    green = (0, 255, 0)
    border = (gt == green).all(axis=2)
    assert border[8, 8:14].all() and border[8:14, 13].all() and border.sum() == 20  # the 6x6 square's edge
    assert (gt[~border] == 100).all()
    assert (predicted[2:6, 2:6] == 255).all() and (predicted[border] == green).all()
    assert (predicted[0, 0] == 0).all() and (predicted[10, 10] == 0).all()
    assert (outline(rgb, np.zeros((16, 16), bool)) == rgb).all()


# --------------------------------------------------------------------------- predict.py


def write_new_images(folder: Path) -> dict[str, tuple[int, int]]:
    """Images of several sizes and modes in a folder and a sub-folder; name -> (width, height)."""
    rng = np.random.default_rng(7)
    pictures = {
        "rgb.png": Image.fromarray(texture(rng, (64, 64))),
        "grey.png": Image.fromarray(texture(rng, (90, 50))[..., 0], mode="L"),
        "sub/alpha.png": Image.fromarray(np.dstack([texture(rng, (40, 80)), np.full((40, 80), 200, np.uint8)]),
                                         mode="RGBA"),
        "sub/photo.jpg": Image.fromarray(texture(rng, (33, 47))),
    }
    for name, picture in pictures.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        picture.save(folder / name)
    return {name: picture.size for name, picture in pictures.items()}


def read_scores(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_predict_writes_overlays_masks_at_original_size_and_a_csv(trained, tmp_path, capsys):
    _, _, run_dir, _ = trained
    sizes = write_new_images(tmp_path / "new")
    out = tmp_path / "predicted"
    assert inference.main([f"checkpoint={run_dir / 'best.pt'}", f"input={tmp_path / 'new'}", f"output={out}"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"predictions: {out}"
    for name, size in sizes.items():
        stem = Path(name).with_suffix("")
        with Image.open(out / f"{stem}_overlay.png") as overlay, Image.open(out / f"{stem}_mask.png") as mask:
            assert overlay.size == mask.size == size and overlay.mode == "RGB"
            assert set(np.unique(np.asarray(mask))) <= {0, 255}
    rows = read_scores(out / "scores.csv")
    assert sorted(Path(r["path"]).relative_to(tmp_path / "new").as_posix() for r in rows) == sorted(sizes)
    normal = json.loads((run_dir / "evaluation.json").read_text())["thresholds"]["normal_threshold"]
    for row in rows:
        assert float(row["threshold"]) == pytest.approx(normal, rel=1e-5)
        assert row["decision"] == ("anomalous" if float(row["score"]) >= float(row["threshold"]) else "normal")
        stem = Path(row["path"]).relative_to(tmp_path / "new").with_suffix("")
        with Image.open(out / f"{stem}_mask.png") as mask:
            if row["decision"] == "normal":
                assert not np.asarray(mask).any()  # no mask contradicts its decision


@pytest.mark.slow
def test_predict_scores_test_images_exactly_as_evaluation_does(trained, tmp_path):
    from datasets.build import build_datasets
    from models.anomaly_map import image_scores
    from engine.evaluation import anomaly_maps

    data_root, _, run_dir, _ = trained
    out = tmp_path / "predicted"
    test_folder = data_root / "widget" / "test"
    assert inference.main([f"checkpoint={run_dir / 'best.pt'}", f"input={test_folder}", f"output={out}",
                         "threshold=f1"]) == 0
    rows = {r["path"]: r for r in read_scores(out / "scores.csv")}
    model, config, thresholds, device = inference.load_run(run_dir / "best.pt", {})
    splits = build_datasets("mvtec", data_root, "widget", 64, 0.25, 0)
    expected = image_scores(anomaly_maps(model, splits.test, config, device)["maps"]).tolist()
    assert len(rows) == len(expected) == 6
    for i, score in enumerate(expected):
        row = rows[splits.test[i]["path"]]
        assert float(row["score"]) == pytest.approx(score, rel=1e-5)
        assert float(row["threshold"]) == pytest.approx(thresholds["image_f1_threshold"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("case, fragment", [
    ("empty folder", "no images in"),
    ("unreadable image", "cannot read image"),
    ("checkpoint never evaluated", "was never evaluated"),
    ("unknown argument", "unknown argument 'colour'"),
    ("unknown threshold", "threshold is 'median'; choose one of normal, f1"),
    ("missing input", "give input=..."),
])
def test_predict_refuses_bad_input_in_one_line(case, fragment, trained, tmp_path, capsys):
    _, _, run_dir, _ = trained
    images = tmp_path / "images"
    write_new_images(images)
    args = [f"checkpoint={run_dir / 'best.pt'}", f"input={images}", f"output={tmp_path / 'out'}"]
    if case == "empty folder":
        (tmp_path / "empty").mkdir()
        args[1] = f"input={tmp_path / 'empty'}"
    elif case == "unreadable image":
        (images / "broken.png").write_bytes(b"this is not a png")
    elif case == "checkpoint never evaluated":
        args[0] = f"checkpoint={run_dir / 'last.pt'}"
    elif case == "unknown argument":
        args.append("colour=red")
    elif case == "unknown threshold":
        args.append("threshold=median")
    elif case == "missing input":
        args = args[:1]
    capsys.readouterr()
    assert inference.main(args) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and fragment in error and "\n" not in error
    assert not (tmp_path / "out" / "scores.csv").exists()


def test_predict_missing_checkpoint_exits_with_code_2(tmp_path):
    write_new_images(tmp_path / "new")
    result = subprocess.run([sys.executable, "predict.py", f"checkpoint={tmp_path / 'nowhere' / 'best.pt'}",
                             f"input={tmp_path / 'new'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    error = result.stderr.strip()
    assert error.startswith("error: ") and str(tmp_path / "nowhere" / "best.pt") in error and "\n" not in error
    assert result.stdout == ""


# --------------------------------------------------------------------------- summary


@pytest.mark.slow
def test_a_run_regenerates_the_summary_and_prints_the_same_columns(trained):
    _, out, _, printed = trained
    assert f"report: {out / 'summary.md'}" in printed
    header = next(line for line in printed.splitlines() if line.startswith("category"))
    assert header.split()[1:] == [title for _, title in COLUMNS]
    markdown = (out / "summary.md").read_text()
    assert "| widget |" in markdown and "| **mean** |" in markdown and "| MemKD | paper | 99.6 | 98.2 |" in markdown


def fake_results(out: Path, folder: str, method: str, dataset: str, category: str, value: float) -> None:
    path = out / folder / dataset / category / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    metrics = {key: value for key, _ in COLUMNS}
    metrics["pixel_aupro"] = None  # undefined metrics are written as null
    path.write_text(json.dumps({"method": method, "dataset": dataset, "category": category, "backbone": "resnet18",
                                "image_size": 256, **metrics}))


def test_summary_has_category_mean_and_paper_rows(tmp_path):
    out = tmp_path / "results"
    fake_results(out, "memkd-st", "MemKD-ST", "mvtec", "cable", 0.90)
    fake_results(out, "memkd-st", "MemKD-ST", "mvtec", "bottle", 0.80)
    fake_results(out, "rd4ad", "RD4AD", "mvtec", "bottle", 0.70)
    fake_results(out, "memkd-st", "MemKD-ST", "demo", "brick", 0.60)
    (out / "stpm" / "mvtec" / "carpet").mkdir(parents=True)
    (out / "stpm" / "mvtec" / "carpet" / "results.json").write_text("{torn")
    markdown_path, csv_path = write_summary(out)

    with csv_path.open(newline="") as f:
        rows = {(r["dataset"], r["method"], r["source"], r["category"]): r for r in csv.DictReader(f)}
    assert set(rows) == {
        ("mvtec", "MemKD-ST", "ours", "bottle"), ("mvtec", "MemKD-ST", "ours", "cable"),
        ("mvtec", "MemKD-ST", "ours", "mean"), ("mvtec", "RD4AD", "ours", "bottle"), ("mvtec", "RD4AD", "ours", "mean"),
        ("demo", "MemKD-ST", "ours", "brick"), ("demo", "MemKD-ST", "ours", "mean"),
        *{("mvtec", method, "paper", "mean") for method in PAPER_MEANS},
    }
    assert float(rows["mvtec", "MemKD-ST", "ours", "mean"]["image_auroc"]) == pytest.approx(0.85)
    assert rows["mvtec", "MemKD-ST", "ours", "mean"]["pixel_aupro"] == ""
    assert float(rows["mvtec", "STPM", "paper", "mean"]["pixel_auroc"]) == pytest.approx(0.970)

    markdown = markdown_path.read_text()
    demo_section = markdown.split("## demo")[1].split("## mvtec")[0]
    mvtec_section = markdown.split("## mvtec")[1]
    assert "| brick | 60.0 |" in demo_section and "| MemKD-ST | ours | 60.0 |" in demo_section
    assert "paper" not in demo_section
    assert "| MemKD-ST | ours | 85.0 | 85.0 | - | 85.0 | 85.0 | 85.0 |" in mvtec_section
    assert "| bottle | 80.0 |" in mvtec_section and "| cable | 90.0 |" in mvtec_section
    assert "| **mean** | 85.0 | 85.0 | - | 85.0 | 85.0 | 85.0 |" in mvtec_section
    assert "| RD4AD | paper | 98.5 | 97.8 |" in mvtec_section and "| STPM | paper | 95.5 | 97.0 |" in mvtec_section
    assert mvtec_section.index("### MemKD-ST") < mvtec_section.index("### RD4AD")
    assert "stpm/mvtec/carpet/results.json" in markdown  # named as skipped, not silently dropped
