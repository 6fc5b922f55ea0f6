"""End to end: both scripts train and evaluate on a generated MVTec-layout folder."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.fixtures import make_mvtec_folder, tiny_run_args
from engine.cli import main

# End to end: each test trains through the scripts, runs benchmarks or several processes.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
RESULT_FIELDS = {"method", "backbone", "teacher_weights", "dataset", "category", "memory_enabled", "image_auroc",
                 "pixel_auroc", "epochs", "image_size", "seed", "train_seconds", "eval_seconds"}


def small_run(data_root: Path, out: Path, *extra: str) -> list[str]:
    return tiny_run_args(data_root, out, *extra, epochs=2)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_mvtec_folder(tmp_path_factory.mktemp("mvtec"), "widget", n_train=8, n_good_test=3, n_defect=3)


@pytest.mark.parametrize("script, folder", [("trainRM_ST.py", "memkd-st"), ("trainRM_RD.py", "memkd-rd")])
def test_each_script_trains_two_epochs_and_writes_results(script, folder, data_root, tmp_path):
    result = subprocess.run([sys.executable, script, *small_run(data_root, tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    results_path = tmp_path / folder / "mvtec" / "widget" / "results.json"
    assert result.stdout.strip().splitlines()[-1] == f"results: {results_path}"
    results = json.loads(results_path.read_text())
    assert RESULT_FIELDS <= set(results)
    assert results["dataset"] == "mvtec" and results["category"] == "widget" and results["epochs"] == 2
    assert results["memory_enabled"] is True and "random init" in results["teacher_weights"]
    assert 0 <= results["image_auroc"] <= 1 and 0 <= results["pixel_auroc"] <= 1
    assert 0 <= results["recall_entropy"] <= 1 and 0 <= results["exemplar_entropy"] <= 1
    assert "I-AUROC" in result.stdout and "teacher resnet18: random init" in result.stdout
    for name in ("best.pt", "last.pt", "history.json"):
        assert (results_path.parent / name).is_file()


def test_phase_test_reloads_best_and_reproduces_scores_exactly(data_root, tmp_path):
    assert main("st", small_run(data_root, tmp_path)) == 0
    run_dir = tmp_path / "memkd-st" / "mvtec" / "widget"
    trained = json.loads((run_dir / "results.json").read_text())
    best = torch.load(run_dir / "best.pt", weights_only=True)
    assert best["config"]["train.epochs"] == 2 and best["config"]["memory.slots"] == 50  # resolved config inside
    assert any(k.startswith("memories.0.memory.rows") for k in best["student"])
    assert main("st", small_run(data_root, tmp_path, "phase=test")) == 0
    tested = json.loads((run_dir / "results.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1_max", "normal_threshold"):
        assert tested[key] == trained[key], key


def test_memory_off_trains_the_baseline_into_its_own_folder(data_root, tmp_path):
    assert main("rd", small_run(data_root, tmp_path, "memory.enabled=false", "train.epochs=1")) == 0
    results = json.loads((tmp_path / "rd4ad" / "mvtec" / "widget" / "results.json").read_text())
    assert results["method"] == "RD4AD" and results["memory_enabled"] is False
    assert results["recall_entropy"] is None


def test_a_checkpoint_that_does_not_fit_is_refused(data_root, tmp_path, capsys):
    assert main("st", small_run(data_root, tmp_path, "train.epochs=1")) == 0
    capsys.readouterr()
    assert main("st", small_run(data_root, tmp_path, "train.epochs=1", "phase=test", "memory.slots=7")) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: checkpoint") and "memory.slots=50 (checkpoint) vs 7 (now)" in error
    assert "\n" not in error


def test_rerunning_a_finished_run_skips_it(data_root, tmp_path, capsys):
    args = small_run(data_root, tmp_path, "train.epochs=1", "memory.enabled=false")
    assert main("st", args) == 0
    stamp = (tmp_path / "stpm" / "mvtec" / "widget" / "best.pt").stat().st_mtime_ns
    capsys.readouterr()
    assert main("st", args) == 0
    assert "reusing the finished run" in capsys.readouterr().out
    assert (tmp_path / "stpm" / "mvtec" / "widget" / "best.pt").stat().st_mtime_ns == stamp


def test_validation_uses_train_images_only(data_root, tmp_path):
    from datasets.build import build_datasets
    splits = build_datasets("mvtec", data_root, "widget", 64, 0.25, 0)
    val_paths = {splits.val[i]["path"] for i in range(len(splits.val))}
    assert val_paths and all("/train/good/" in p for p in val_paths)
    assert not val_paths & {splits.train[i]["path"] for i in range(len(splits.train))}


def test_validation_returns_the_student_to_train_mode(data_root):
    from datasets.build import build_datasets
    from engine.model import build_run_model
    from engine.config import load_config
    from engine.training import validation_error

    config = load_config("st", tiny_run_args(data_root, "unused"))
    model = build_run_model(config)
    model.train()
    splits = build_datasets("mvtec", data_root, "widget", 64, 0.25, 0)
    error = validation_error(model, splits.val, config, torch.device("cpu"))
    assert error > 0 and model.student.training and not model.teacher.training


def test_category_all_runs_every_category_and_prints_a_mean_row(tmp_path, capsys):
    args = ["configs/demo.yaml", f"data.root={tmp_path / 'demo'}", "data.image_size=64", "train.epochs=1",
            "model.fallback_to_random=false", "model.pretrained=false", "memory.exemplars=2",
            "eval.max_pictures=0", f"output.dir={tmp_path / 'out'}"]
    assert main("st", [str(ROOT / args[0]), *args[1:]]) == 0
    out = capsys.readouterr().out
    table = out[out.index("MemKD-ST on demo"):]
    assert all(f"\n{c} " in table for c in ("brick", "gravel", "grass")) and "\nmean " in table
    summary_path = tmp_path / "out" / "memkd-st" / "demo" / "summary.json"
    assert out.strip().splitlines()[-1] == f"summary: {summary_path}"
    summary = json.loads(summary_path.read_text())
    assert [r["category"] for r in summary["categories"]] == ["brick", "gravel", "grass"]
    assert summary["mean"]["image_auroc"] == pytest.approx(
        sum(r["image_auroc"] for r in summary["categories"]) / 3)


@pytest.mark.parametrize("dataset, make, category", [
    ("mvtec", "make_mvtec_folder", "widget"), ("mpdd", "make_mvtec_folder", "widget"),
    ("btad", "make_btad_folder", "01"), ("mvtec3d", "make_mvtec3d_folder", "bagel"),
    ("eyecandies", "make_eyecandies_folder", "CandyCane"), ("visa", "make_visa_folder", "candle"),
    ("folder", "make_user_folder", "parts"),
])
def test_one_short_training_run_on_each_dataset_layout(dataset, make, category, tmp_path):
    import tests.fixtures as fixtures

    root = getattr(fixtures, make)(tmp_path / "data", (category,) if dataset == "visa" else category)
    args = tiny_run_args(root, tmp_path / "out", f"data.dataset={dataset}", f"data.category={category}",
                         "memory.exemplars=1", "data.val_fraction=0.2")
    assert main("rd", args) == 0
    results = json.loads((tmp_path / "out" / "memkd-rd" / dataset / category / "results.json").read_text())
    assert results["dataset"] == dataset and 0 <= results["image_auroc"] <= 1
