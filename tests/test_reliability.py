"""Runs that survive interruption and lose nothing: resume after SIGKILL, determinism, atomic
writes, checkpoints that say what they are, and a clean stop when training diverges."""
from __future__ import annotations

import ast
import errno
import io
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import engine.run as engine
import engine.training as training
from utils.locks import LOCK_NAME
from models.memkd import MemKD
from tests.fixtures import make_mvtec_folder, tiny_run_args
from engine.checkpoint import FORMAT_VERSION, load_checkpoint
from engine.cli import main
from engine.config import SCHEMA, load_config
from utils.errors import UserError
from utils.io import _TEMPORARY_NAME, remove_stale_temporaries, save_torch, write_json

ROOT = Path(__file__).resolve().parent.parent
# Timing only: everything else in results.json must repeat exactly.
TIMING_KEYS = ("train_seconds", "eval_seconds", "picture_seconds", "results_path", "config")


def run_args(data_root: Path, out: Path, *extra: str, size: int = 64, epochs: int = 2) -> list[str]:
    """A tiny CPU run of category "widget" with a random resnet18 teacher."""
    return tiny_run_args(data_root, out, *extra, size=size, epochs=epochs)


def run_dir(out: Path, method: str = "memkd-st") -> Path:
    return out / method / "mvtec" / "widget"


def scores(out: Path) -> dict[str, Any]:
    """results.json without the keys that legitimately differ between runs (timings, paths)."""
    results = json.loads((run_dir(out) / "results.json").read_text())
    return {k: v for k, v in results.items() if k not in TIMING_KEYS}


def assert_same_student(a: Path, b: Path) -> None:
    first, second = (torch.load(p, map_location="cpu", weights_only=True)["student"] for p in (a, b))
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if _TEMPORARY_NAME.fullmatch(p.name)]


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mvtec_folder(tmp_path_factory.mktemp("mvtec"), "widget")  # 6 train, 2 val, 6 test images


@pytest.fixture(scope="module")
def finished(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An output folder with one finished 2-epoch run. Tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("finished")
    assert main("st", run_args(data_root, out)) == 0
    return out


# ----------------------------------------------------------------------------------------------
# Resume after SIGKILL, and determinism


def _read_lines(stream: io.TextIOBase, lines: "queue.Queue[tuple[float, str]]") -> None:
    for line in stream:
        lines.put((time.monotonic(), line))


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_to_exactly_the_same_scores(tmp_path: Path) -> None:
    """SIGKILL in the middle of epoch 3 of 5, rerun the same command: the same scores, to the last bit."""
    data = make_mvtec_folder(tmp_path / "data", "widget", n_train=16, n_good_test=2, n_defect=2, size=96)
    # 96 px, 12 training images in 3 batches: an epoch lasts long enough to be hit in the middle.
    reference, out = tmp_path / "reference", tmp_path / "killed"
    assert main("st", run_args(data, reference, size=96, epochs=5)) == 0

    command = [sys.executable, "trainRM_ST.py", *run_args(data, out, size=96, epochs=5)]
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[tuple[float, str]] = queue.Queue()
    threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True).start()
    finished_at: dict[int, float] = {}  # epoch -> when its line (printed after last.pt is saved) appeared
    try:
        while 2 not in finished_at:
            stamp, line = lines.get(timeout=300)
            if line.startswith("epoch "):
                finished_at[int(line.split()[1])] = stamp
        # Half an epoch into epoch 3: last.pt holds epoch 2, epoch 3 is part-way.
        time.sleep((finished_at[2] - finished_at[1]) / 2)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    interrupted_at = load_checkpoint(run_dir(out) / "last.pt")["epoch"]
    assert 2 <= interrupted_at < 5 and not (run_dir(out) / "results.json").exists()

    resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {run_dir(out) / 'last.pt'} after epoch {interrupted_at}" in resumed.stdout
    assert scores(out) == scores(reference)
    assert json.loads((run_dir(out) / "history.json").read_text()) == \
        json.loads((run_dir(reference) / "history.json").read_text())
    assert_same_student(run_dir(out) / "best.pt", run_dir(reference) / "best.pt")
    assert not temporaries(out)  # a kill during a save leaves one; the rerun clears it


@pytest.mark.slow
def test_two_runs_with_the_same_seed_give_identical_scores_whatever_the_global_rng(
        data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same seed, same numbers; and training draws nothing from torch's global RNG (that is why
    last.pt needs no RNG state): scrambling it before training changes nothing."""
    first, second = tmp_path / "first", tmp_path / "second"
    assert main("st", run_args(data_root, first)) == 0
    train = engine.train

    def train_after_scrambling_the_global_rng(*args: Any, **kwargs: Any) -> Any:
        torch.manual_seed(987654321)
        torch.rand(1000)
        return train(*args, **kwargs)

    monkeypatch.setattr(engine, "train", train_after_scrambling_the_global_rng)
    assert main("st", run_args(data_root, second)) == 0
    assert scores(first) == scores(second)
    assert_same_student(run_dir(first) / "best.pt", run_dir(second) / "best.pt")
    assert_same_student(run_dir(first) / "last.pt", run_dir(second) / "last.pt")


@pytest.mark.slow
def test_resume_refuses_a_changed_exemplar_set(data_root: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    shutil.copytree(data_root, data)
    out = tmp_path / "out"
    args = run_args(data, out, epochs=1)
    assert main("st", args) == 0
    last = load_checkpoint(run_dir(out) / "last.pt")
    assert last["exemplar_files"] and all(name.startswith("widget/train/good/") for name in last["exemplar_files"])
    (run_dir(out) / "results.json").unlink()  # unfinished: the rerun resumes from last.pt
    exemplar = data / last["exemplar_files"][0]
    exemplar.rename(exemplar.with_name("zzz.png"))  # same number of images, another exemplar set
    before = (run_dir(out) / "last.pt").read_bytes()
    capsys.readouterr()
    assert main("st", args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "was trained on other images" in line and "train.resume=false" in line
    assert (run_dir(out) / "last.pt").read_bytes() == before


# ----------------------------------------------------------------------------------------------
# Checkpoints: format version, resolved config, refusal of another backbone, L or method


@pytest.mark.slow
def test_checkpoints_carry_format_version_resolved_config_and_resume_state(data_root: Path, finished: Path) -> None:
    config = load_config("st", run_args(data_root, finished))
    best = torch.load(run_dir(finished) / "best.pt", map_location="cpu", weights_only=True)
    last = torch.load(run_dir(finished) / "last.pt", map_location="cpu", weights_only=True)
    for state in (best, last):
        assert state["format_version"] == FORMAT_VERSION and state["method"] == "st"
        assert state["config"] == config.flat()
    assert last["epoch"] == 2 and len(last["history"]) == 2
    assert {"optimizer", "scheduler", "best_error", "best_epoch"} <= last.keys()
    assert last["optimizer"]["state"], "SGD momentum buffers must be saved, or a resumed run would differ"
    # The exemplar set saved is the one a rerun draws.
    train_images = len(list((data_root / "widget" / "train" / "good").iterdir())) - 2  # 2 validation images
    assert last["exemplars"] == training.choose_exemplars(train_images, 2, config.train.seed)


@pytest.mark.slow
@pytest.mark.parametrize("script_method, extra, says", [
    ("st", ["model.backbone=resnet34"], "model.backbone='resnet18' (checkpoint) vs 'resnet34' (now)"),
    ("st", ["memory.slots=7"], "memory.slots=50 (checkpoint) vs 7 (now)"),
    ("rd", [], "is for method 'st', not 'rd'"),
    ("st", ["format"], "has format version 999, this code reads"),
], ids=["another backbone", "another L", "another method", "another format version"])
def test_a_checkpoint_that_does_not_fit_is_refused_saying_what_differs(
        script_method: str, extra: list[str], says: str, data_root: Path, finished: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    best = run_dir(out) / "best.pt"
    if script_method == "rd":  # a MemKD-ST checkpoint where MemKD-RD looks for its own
        run_dir(out, "memkd-rd").mkdir(parents=True)
        best = Path(shutil.copy(best, run_dir(out, "memkd-rd") / "best.pt"))
    if extra == ["format"]:
        state = torch.load(best, weights_only=True)
        save_torch(best, {**state, "format_version": 999})
        extra = []
    before = best.read_bytes()
    capsys.readouterr()
    assert main(script_method, run_args(data_root, out, "phase=test", *extra)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: checkpoint {best}") and says in line
    assert best.read_bytes() == before


@pytest.mark.slow
def test_resume_refuses_last_pt_of_another_config(data_root: Path, finished: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    capsys.readouterr()
    assert main("st", run_args(data_root, out, "memory.slots=7")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "last.pt was made with another config: memory.slots=50 (checkpoint) vs 7 (now)" in line


def test_every_torch_load_in_the_code_is_weights_only() -> None:
    """Scans every .py file outside tests (predict.py included once it exists) for torch.load calls."""
    calls = []
    for path in ROOT.rglob("*.py"):
        if {"tests", ".git", ".venv", "venv"} & set(path.relative_to(ROOT).parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                weights_only = [k.value for k in node.keywords if k.arg == "weights_only"]
                calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", weights_only))
    assert calls, "expected torch.load in engine/checkpoint.py and models/teacher_weights.py"
    unsafe = [where for where, values in calls
              if not (len(values) == 1 and isinstance(values[0], ast.Constant) and values[0].value is True)]
    assert not unsafe, f"torch.load without weights_only=True at {unsafe}"


# ----------------------------------------------------------------------------------------------
# Atomic writes


@pytest.mark.parametrize("failure", [RuntimeError("crash"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_a_crash_mid_save_leaves_the_previous_checkpoint_intact(failure: BaseException, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    save_torch(path, {"epoch": 1, "weights": torch.arange(10.0)})
    before = path.read_bytes()
    real_save = torch.save

    def save_half_then_fail(obj: Any, f: Any) -> None:
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: buffer.tell() // 2])  # some bytes reach the disk, then the crash
        raise failure

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(type(failure)):
        save_torch(path, {"epoch": 2, "weights": torch.zeros(10)})
    assert path.read_bytes() == before
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary left behind


def test_a_full_disk_mid_write_is_one_line_and_keeps_the_previous_file(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_json(tmp_path / "results.json", {"image_auroc": 0.9})
    before = path.read_bytes()

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(UserError) as raised:
        write_json(path, {"image_auroc": 0.1})
    message = str(raised.value)
    assert "No space left on device" in message and "previous results.json is unchanged" in message
    assert "\n" not in message
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


@pytest.mark.slow
def test_a_failed_checkpoint_save_in_training_keeps_last_pt_and_the_rerun_resumes(
        data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    args = run_args(data_root, out)
    real_save = torch.save

    def disk_full_at_epoch_2(obj: Any, f: Any) -> None:
        if isinstance(obj, dict) and obj.get("epoch") == 2 and "optimizer" in obj:  # last.pt of epoch 2
            buffer = io.BytesIO()
            real_save(obj, buffer)
            f.write(buffer.getvalue()[:1000])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", disk_full_at_epoch_2)
    capsys.readouterr()
    assert main("st", args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"cannot write {run_dir(out) / 'last.pt'} (No space left on device)" in line
    assert load_checkpoint(run_dir(out) / "last.pt")["epoch"] == 1
    assert not temporaries(out)

    monkeypatch.setattr(torch, "save", real_save)
    stale = run_dir(out) / ".best.pt.k1ll3d_x.tmp"  # as a SIGKILL mid-save leaves it
    stale.write_bytes(b"half a checkpoint")
    unrelated = run_dir(out) / ".notes.tmp"
    unrelated.write_text("not ours")
    assert main("st", args) == 0
    assert "resuming from" in capsys.readouterr().out
    assert not stale.exists() and unrelated.exists()
    assert load_checkpoint(run_dir(out) / "last.pt")["epoch"] == 2


@pytest.mark.slow
def test_every_output_file_is_written_atomically(data_root: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file a run leaves (checkpoints, results, history, summaries, pictures) arrived by an
    atomic rename of a utils.io temporary: none can be seen half-written."""
    out = tmp_path / "out"
    renamed: set[Path] = set()
    real_replace = os.replace

    def recording_replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        real_replace(src, dst, *args, **kwargs)
        if _TEMPORARY_NAME.fullmatch(Path(src).name):
            renamed.add(Path(dst).resolve())

    monkeypatch.setattr(os, "replace", recording_replace)
    pictures = ["eval.max_pictures=1"] if "eval.max_pictures" in SCHEMA else []
    assert main("st", run_args(data_root, out, "train.epochs=1", *pictures)) == 0
    # The run lock is no output: it is the file a flock is held on, so it cannot be replaced by renames.
    written = {p.resolve() for p in out.rglob("*") if p.is_file() and p.name != LOCK_NAME}
    assert {"best.pt", "last.pt", "results.json", "history.json", "curves.png"} <= {p.name for p in written}
    assert written <= renamed, f"written without utils.io: {sorted(map(str, written - renamed))}"


def test_remove_stale_temporaries_touches_only_atomic_write_leftovers(tmp_path: Path) -> None:
    ours = [tmp_path / ".last.pt.abcd1234.tmp", tmp_path / ".results.json.x_9y8z7w.tmp"]
    others = [tmp_path / ".marker.tmp", tmp_path / "last.pt", tmp_path / "notes.tmp"]
    for path in ours + others:
        path.write_bytes(b"x")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(ours)
    assert all(p.exists() for p in others) and not any(p.exists() for p in ours)


# ----------------------------------------------------------------------------------------------
# Non-finite loss


def _unchanged_epoch_1(out: Path) -> None:
    for name in ("last.pt", "best.pt"):
        state = load_checkpoint(run_dir(out) / name)
        assert state["epoch"] == 1
        assert all(torch.isfinite(t).all() for t in state["student"].values() if t.is_floating_point())
    assert not (run_dir(out) / "results.json").exists()


@pytest.mark.slow
def test_a_nan_loss_at_epoch_2_stops_naming_epoch_and_step_and_keeps_epoch_1(
        data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    real_loss = MemKD.loss
    steps_per_epoch = 2  # 6 training images, batches of 4
    calls = {"n": 0}
    saved_after_epoch_1: dict[str, bytes] = {}

    def loss_nan_from_epoch_2(self: MemKD, images: torch.Tensor,
                              teacher_features: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        calls["n"] += 1
        losses = real_loss(self, images, teacher_features)
        if calls["n"] > steps_per_epoch:
            saved_after_epoch_1.setdefault("last.pt", (run_dir(out) / "last.pt").read_bytes())
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(MemKD, "loss", loss_nan_from_epoch_2)
    capsys.readouterr()
    assert main("st", run_args(data_root, out, "train.epochs=3")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "the loss became nan at epoch 2, step 1" in line
    assert f"{run_dir(out) / 'last.pt'} from epoch 1 is kept unchanged" in line and "lower train.lr" in line
    assert (run_dir(out) / "last.pt").read_bytes() == saved_after_epoch_1["last.pt"]
    _unchanged_epoch_1(out)


@pytest.mark.slow
def test_weights_that_turn_non_finite_on_the_last_step_never_reach_a_checkpoint(
        data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The loss of the last step of epoch 2 is finite, but its update breaks the weights."""
    out = tmp_path / "out"
    build_optimizer = training.build_optimizer

    def poisoning_optimizer(parameters: list[torch.nn.Parameter], config: dict[str, Any]) -> torch.optim.Optimizer:
        optimizer = build_optimizer(parameters, config)
        calls = {"n": 0}

        def poison_after_step(*_: Any) -> None:
            calls["n"] += 1
            if calls["n"] == 4:  # epoch 2, step 2 of 2
                with torch.no_grad():
                    parameters[0].fill_(float("inf"))

        optimizer.register_step_post_hook(poison_after_step)
        return optimizer

    monkeypatch.setattr(training, "build_optimizer", poisoning_optimizer)
    capsys.readouterr()
    assert main("st", run_args(data_root, out, "train.epochs=3")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "became non-finite at epoch 2, step 2" in line and "from epoch 1 is kept unchanged" in line
    _unchanged_epoch_1(out)


@pytest.mark.slow
def test_a_huge_learning_rate_stops_with_one_line(data_root: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    capsys.readouterr()
    assert main("st", run_args(data_root, out, "train.lr=1e30")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "training diverged" in line and "at epoch 1, step" in line and "lower train.lr" in line
    assert not (run_dir(out) / "last.pt").exists() and not (run_dir(out) / "best.pt").exists()


def test_an_onnx_export_given_as_a_checkpoint_is_named_as_such(tmp_path: Path) -> None:
    from engine.checkpoint import load_checkpoint

    graph = tmp_path / "best.onnx"
    graph.write_bytes(b"\x08\x07")
    with pytest.raises(UserError, match="is an ONNX export, not a checkpoint; predict.py scores it with backend=onnx"):
        load_checkpoint(graph)


def test_a_folder_given_as_a_checkpoint_is_named_as_a_folder(tmp_path: Path) -> None:
    from engine.checkpoint import load_checkpoint

    with pytest.raises(UserError, match="is a folder; give the best.pt inside a run folder"):
        load_checkpoint(tmp_path)
