"""Runs as a user sees them: learning, re-scoring without retraining, what identifies a finished
run, and what a run may write or must keep."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import engine.inference as inference
from tests.fixtures import make_mvtec_folder, tiny_run_args
from engine.checkpoint import weights_digest
from engine.cli import main

# End to end: each test trains through the scripts, runs benchmarks or several processes.
pytestmark = pytest.mark.slow

FOLDERS = {"st": "memkd-st", "rd": "memkd-rd"}


def run_dir(out: Path, method: str = "st") -> Path:
    return out / FOLDERS[method] / "mvtec" / "widget"


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mvtec_folder(tmp_path_factory.mktemp("runs") / "data")


@pytest.fixture(scope="module")
def finished(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("finished")
    assert main("st", tiny_run_args(data_root, out, epochs=2)) == 0
    return out


def snapshot(folder: Path, names=("best.pt", "last.pt", "history.json")) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in names}


@pytest.mark.parametrize("method", ["st", "rd"])
def test_a_short_run_learns_to_find_obvious_defects(method, tmp_path):
    """Not plumbing: L_KD falls and the bright defects are found far above chance."""
    root = make_mvtec_folder(tmp_path / "data", n_train=24, n_good_test=8, n_defect=8)
    out = tmp_path / "out"
    assert main(method, tiny_run_args(root, out, "memory.exemplars=4", epochs=4)) == 0
    history = json.loads((run_dir(out, method) / "history.json").read_text())
    kd = [record["kd"] for record in history]
    assert kd[-1] < 0.7 * kd[0] and all(b < a for a, b in zip(kd, kd[1:])), kd
    results = json.loads((run_dir(out, method) / "results.json").read_text())
    assert results["image_auroc"] >= 0.9 and results["pixel_auroc"] >= 0.85, results


def test_phase_test_rescores_with_other_eval_settings_without_touching_training_outputs(finished, data_root, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    folder = run_dir(out)
    before = snapshot(folder)
    trained = json.loads((folder / "results.json").read_text())
    args = tiny_run_args(data_root, out, "phase=test", "eval.combine=sum", "eval.sigma=4", epochs=2)
    assert main("st", args) == 0
    assert snapshot(folder) == before  # best.pt, last.pt and history.json as training wrote them
    results = json.loads((folder / "results.json").read_text())
    evaluation = json.loads((folder / "evaluation.json").read_text())
    assert evaluation["scoring"] == {"eval.combine": "sum", "eval.sigma": 4.0, "eval.save_maps": False}
    assert results["config"]["eval.combine"] == "sum" and results["pixel_auroc"] != trained["pixel_auroc"]
    # Training facts survive a test-only phase.
    for key in ("train_seconds", "recall_entropy", "exemplar_entropy", "best_epoch"):
        assert results[key] == trained[key] and results[key] is not None, key
    # predict.py scores with the evaluation's settings and thresholds.
    assert inference.main([f"checkpoint={folder / 'best.pt'}", f"input={data_root / 'widget' / 'test'}",
                         f"output={tmp_path / 'pred'}"]) == 0


def test_finished_results_are_not_reused_for_other_training_images(finished, data_root, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    other = tmp_path / "other"
    shutil.copytree(data_root, other)
    image = sorted((other / "widget" / "train" / "good").iterdir())[0]
    image.write_bytes(image.read_bytes() + b"\0" * 16)  # same names, other content
    before = (run_dir(out) / "results.json").read_bytes()
    capsys.readouterr()
    assert main("st", tiny_run_args(other, out, epochs=2)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "trained on other images" in line and "output.dir" in line
    assert (run_dir(out) / "results.json").read_bytes() == before


def test_a_run_missing_an_output_is_not_finished_and_the_rerun_restores_it(finished, data_root, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    history = (run_dir(out) / "history.json").read_bytes()
    (run_dir(out) / "history.json").unlink()  # killed between results.json and history.json
    capsys.readouterr()
    assert main("st", tiny_run_args(data_root, out, epochs=2)) == 0
    assert "reusing the finished run" not in capsys.readouterr().out
    assert (run_dir(out) / "history.json").read_bytes() == history


@pytest.mark.parametrize("category", ["../../../victim", "/tmp/absolute", "x" * 300])
def test_a_category_that_is_a_path_writes_nothing(category, data_root, tmp_path, capsys):
    work = tmp_path / "work"
    (work / "a" / "b").mkdir(parents=True)
    out = work / "a" / "b" / "out"
    assert main("st", tiny_run_args(data_root, out, f"data.category={category}")) == 2
    assert "data.category" in one_error_line(capsys.readouterr().err)
    assert sorted(p.relative_to(work).as_posix() for p in work.rglob("*")) == ["a", "a/b"]


def test_a_run_that_fails_its_checks_creates_no_folder(data_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert main("st", tiny_run_args(data_root, out, "data.category=missing")) == 2
    one_error_line(capsys.readouterr().err)
    assert not out.exists()


def _rewrite(path: Path, change) -> None:
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


@pytest.mark.parametrize("case, fragment", [
    ("nan weights", "non-finite weights"),
    ("flipped bytes", "do not match their stored digest"),
    ("missing key", "lacks 'data_digest'"),
    ("wrong shapes", "does not fit the configured student"),
])
def test_a_broken_checkpoint_is_one_line_for_predict_and_phase_test(case, fragment, finished, data_root, tmp_path,
                                                                    capsys):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    best = run_dir(out) / "best.pt"

    def nan(state):
        name = next(k for k, v in state["student"].items() if v.is_floating_point())
        state["student"][name] = torch.full_like(state["student"][name], float("nan"))
        state["student_digest"] = weights_digest(state["student"])

    def flip(state):
        name = next(k for k, v in state["student"].items() if v.is_floating_point())
        state["student"][name] = state["student"][name].clone()
        state["student"][name].view(-1)[0] += 1.0

    def drop(state):
        del state["data_digest"]

    def reshape(state):
        name = next(k for k, v in state["student"].items() if v.dim() == 4)
        state["student"][name] = torch.zeros(3, 3, 1, 1)
        state["student_digest"] = weights_digest(state["student"])

    _rewrite(best, {"nan weights": nan, "flipped bytes": flip, "missing key": drop, "wrong shapes": reshape}[case])
    evaluation = json.loads((run_dir(out) / "evaluation.json").read_text())
    evaluation["student_digest"] = torch.load(best, weights_only=True).get("student_digest")
    (run_dir(out) / "evaluation.json").write_text(json.dumps(evaluation))
    capsys.readouterr()
    assert inference.main([f"checkpoint={best}", f"input={data_root / 'widget' / 'test'}",
                         f"output={tmp_path / 'pred'}"]) == 2
    assert fragment in one_error_line(capsys.readouterr().err)
    assert main("st", tiny_run_args(data_root, out, "phase=test", epochs=2)) == 2
    assert fragment in one_error_line(capsys.readouterr().err)


def _same_size_other_bytes(path: Path, source: Path) -> None:
    """Make ``path`` hold ``source``'s picture, padded to ``path``'s byte size (PNG readers ignore
    what follows the image's end): same name, same size, other content."""
    size, data = path.stat().st_size, source.read_bytes()
    assert len(data) <= size, "pick a smaller source"
    path.write_bytes(data + b"\0" * (size - len(data)))


def test_same_names_and_sizes_with_other_bytes_are_other_data(finished, data_root, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    other = tmp_path / "other"
    shutil.copytree(data_root, other)
    images = sorted((other / "widget" / "train" / "good").iterdir(), key=lambda p: p.stat().st_size)
    _same_size_other_bytes(images[-1], images[0])
    before = snapshot(run_dir(out), ("best.pt", "last.pt", "results.json"))
    capsys.readouterr()
    assert main("st", tiny_run_args(other, out, epochs=2)) == 2
    captured = capsys.readouterr()
    assert "reusing the finished run" not in captured.out
    assert "trained on other images" in one_error_line(captured.err)
    assert snapshot(run_dir(out), ("best.pt", "last.pt", "results.json")) == before


def test_a_corrected_test_mask_is_evaluated_again_without_retraining(finished, data_root, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    other = tmp_path / "other"
    shutil.copytree(data_root, other)
    mask = sorted((other / "widget" / "ground_truth").rglob("*.png"))[0]
    Image.open(mask).convert("L").point(lambda v: 255 - v).save(mask)  # another ground truth, same file name
    training_files = ("best.pt", "last.pt", "history.json", "curves.png")
    trained = snapshot(run_dir(out), training_files)
    written = {name: (run_dir(out) / name).stat().st_mtime_ns for name in training_files}
    old = json.loads((run_dir(out) / "results.json").read_text())
    capsys.readouterr()
    assert main("st", tiny_run_args(other, out, epochs=2)) == 0
    assert "reusing the finished run" not in capsys.readouterr().out
    assert snapshot(run_dir(out), training_files) == trained  # evaluated again, not retrained
    assert {name: (run_dir(out) / name).stat().st_mtime_ns for name in training_files} == written  # nor rewritten
    new = json.loads((run_dir(out) / "results.json").read_text())
    assert new["data_digest"] == old["data_digest"] and new["test_digest"] != old["test_digest"]
    assert new["pixel_auroc"] != old["pixel_auroc"] and new["data_root"] == str(other)
    capsys.readouterr()
    assert main("st", tiny_run_args(other, out, epochs=2)) == 0  # now finished on that data: reused
    assert f"it read data.root={other}" in capsys.readouterr().out


def test_a_retrain_killed_part_way_is_not_taken_for_finished(finished, data_root, tmp_path, capsys, monkeypatch):
    import engine.training as training

    out = tmp_path / "out"
    shutil.copytree(finished, out)
    real_epoch = training._train_one_epoch

    def killed_at_epoch_2(model, losses_of, optimizer, loader, run, epoch, *args, **kwargs):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(model, losses_of, optimizer, loader, run, epoch, *args, **kwargs)

    monkeypatch.setattr(training, "_train_one_epoch", killed_at_epoch_2)
    args = tiny_run_args(data_root, out, epochs=2)
    assert main("st", [*args, "train.resume=false"]) == 130  # best.pt and last.pt of epoch 1, old records beside them
    monkeypatch.setattr(training, "_train_one_epoch", real_epoch)
    capsys.readouterr()
    assert main("st", args) == 0
    assert "reusing the finished run" not in capsys.readouterr().out
    results = json.loads((run_dir(out) / "results.json").read_text())
    best = torch.load(run_dir(out) / "best.pt", weights_only=True)
    assert results["student_digest"] == best["student_digest"]
    assert torch.load(run_dir(out) / "last.pt", weights_only=True)["epoch"] == 2


def test_a_run_that_fails_in_training_leaves_no_folder(data_root, tmp_path, capsys, monkeypatch):
    import engine.training as training
    from utils.errors import UserError

    def fails(*args, **kwargs):
        raise UserError("training diverged: stand-in")

    monkeypatch.setattr(training, "_train_one_epoch", fails)
    out = tmp_path / "out"
    assert main("st", tiny_run_args(data_root, out)) == 2
    assert "stand-in" in one_error_line(capsys.readouterr().err)
    assert not run_dir(out).exists(), list(run_dir(out).iterdir())


def test_a_plain_sweep_skips_a_busy_category_finishes_the_others_and_names_it(tmp_path, capsys):
    from tests.fixtures import make_user_folder
    from utils.locks import RunLock

    root = tmp_path / "data"
    for category in ("aa", "bb"):
        make_user_folder(root, category=category, n_good=8, defects={"crack": 2}, n_test_good=2, size=64)
    out = tmp_path / "out"
    args = [*tiny_run_args(root, out), "data.dataset=folder", "data.category=all"]
    busy = RunLock(out / "memkd-st" / "folder" / "aa")
    assert busy.acquire()  # another sweep holds aa
    assert main("st", args) == 2
    captured = capsys.readouterr()
    assert "aa: skipped" in captured.out and "(aa) not finished" in one_error_line(captured.err)
    assert (out / "memkd-st" / "folder" / "bb" / "results.json").is_file()
    busy.release()
    assert main("st", args) == 0  # aa now trained, bb reused
    assert "bb: reusing the finished run" in capsys.readouterr().out
