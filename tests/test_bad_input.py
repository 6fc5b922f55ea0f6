"""Malformed input, through the real command-line entry: one line naming the problem and its fix,
exit code 2, no traceback (unless --debug), and nothing already on disk damaged.

Each case of :data:`CASES` runs ``engine.cli.main`` in-process (fast); a few also run as a
subprocess, to see the exit code and stderr exactly as a user does. Cases run against an output
folder that already holds a finished run, and every file in it must be byte-identical afterwards.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import models

from utils.locks import LOCK_NAME
from tests.fixtures import make_mvtec_folder, tiny_run_args
from engine.cli import main
from utils.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def run_args(data_root: Path, out: Path, *extra: str) -> list[str]:
    """A tiny CPU run of category "widget": 64 px, random resnet18, 1 epoch."""
    return tiny_run_args(data_root, out, *extra)


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path; run locks (``.lock``, which only say
    who held a folder last) are not results and are left out."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


@dataclass(frozen=True)
class World:
    """What a case can break: a good dataset, a finished run's output folder, a scratch folder."""

    data: Path
    finished: Path
    tmp: Path

    def broken_data(self, edit: Callable[[Path], None]) -> Path:
        """A copy of the good dataset with ``edit(category folder)`` applied; returns its root."""
        root = self.tmp / "data"
        shutil.copytree(self.data, root)
        edit(root / "widget")
        return root

    def copy_of_finished(self) -> Path:
        out = self.tmp / "out"
        shutil.copytree(self.finished, out)
        return out


@dataclass(frozen=True)
class Case:
    """One malformed input: the overrides it adds (built from a World) and what its error must say."""

    name: str
    args: Callable[[World], list[str]]
    says: tuple[str, ...]  # fragments of the one-line message: the problem and its fix
    setup: Callable[[pytest.MonkeyPatch], None] = field(default=lambda monkeypatch: None)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _image(path: Path, size: tuple[int, int]) -> None:
    Image.new("RGB", size, (90, 90, 90)).save(path)


def _teacher_file(world: World, name: str, content: object) -> str:
    path = world.tmp / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    return f"model.teacher_weights={path}"


def _bad_data(edit: Callable[[Path], None], *extra: str) -> Callable[[World], list[str]]:
    # train.resume=false: a finished run with the same config would otherwise be reused (data.root
    # only says where the data is), and training again must not destroy it before the error.
    return lambda w: [f"data.root={w.broken_data(edit)}", "train.resume=false", *extra]


def _yaml(text: str | None, name: str = "override.yaml") -> Callable[[World], list[str]]:
    def args(world: World) -> list[str]:
        path = world.tmp / name
        if text is None:
            path.mkdir()  # a folder: exists but cannot be read as a file
        else:
            path.write_text(text)
        return [str(path)]
    return args


def _corrupt_checkpoint(name: str, *extra: str) -> Callable[[World], list[str]]:
    def args(world: World) -> list[str]:
        out = world.copy_of_finished()
        run = out / "memkd-st" / "mvtec" / "widget"
        (run / "results.json").unlink()  # not finished any more: a rerun must read last.pt
        _truncate(run / name)
        return [f"output.dir={out}", *extra]
    return args


def _dangling_link(world: World) -> Path:
    link = world.tmp / "results-link"
    link.symlink_to(world.tmp / "gone")
    return link


def _no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a machine with a GPU


CASES: list[Case] = [
    # The command line and config files.
    Case("unknown key", lambda w: ["train.epoch=3"], ("unknown config key 'train.epoch'", "keys of 'train'")),
    Case("argument without =", lambda w: ["epochs"], ("cannot read argument 'epochs'", "section.key=value")),
    Case("wrong type", lambda w: ["train.epochs=many"], ("'train.epochs' must be an integer", "'many'")),
    Case("negative lr", lambda w: ["train.lr=-0.1"], ("'train.lr' is -0.1", "must be > 0")),
    Case("L = 0 memory slots", lambda w: ["memory.slots=0"], ("'memory.slots' is 0", "from 1 to 10000")),
    Case("image size not a multiple of the stride", lambda w: ["data.image_size=100"],
         ("'data.image_size' is 100", "multiple of 32")),
    Case("unknown backbone", lambda w: ["model.backbone=vgg16"], ("'model.backbone' is 'vgg16'", "resnet18")),
    Case("unknown dataset", lambda w: ["data.dataset=imagenet"], ("'data.dataset' is 'imagenet'", "mvtec")),
    Case("one Adam beta", lambda w: ["train.betas=[0.5]"], ("'train.betas'", "two numbers")),
    Case("override file missing", lambda w: [str(w.tmp / "missing.yaml")],
         ("missing.yaml does not exist", "existing .yaml")),
    Case("override file not YAML", _yaml("train: [epochs: 3\n"), ("is not valid YAML", "fix its syntax")),
    Case("override file unreadable", _yaml(None), ("cannot read config file", "Is a directory", "readable .yaml")),
    Case("override file a list", _yaml("- train\n- epochs\n"), ("must hold sections", "key: value")),
    Case("cuda without CUDA", lambda w: ["train.device=cuda", "phase=test"], ("no CUDA device", "train.device=auto"),
         _no_cuda),
    # The data.
    Case("missing data root", lambda w: [f"data.root={w.tmp / 'nowhere'}", "data.category=bottle"],
         ("MVTec AD data not found", "nowhere/bottle", "extract it")),
    Case("missing category", lambda w: ["data.category=gadget"], ("category 'gadget'", "available:", "widget")),
    Case("empty train folder", _bad_data(lambda c: [p.unlink() for p in (c / "train" / "good").iterdir()]),
         ("train folder", "is empty", "re-extract")),
    Case("truncated train image", _bad_data(lambda c: _truncate(c / "train" / "good" / "003.png")),
         ("cannot read image", "train/good/003.png", "replace or delete")),
    Case("truncated test image, loader workers", _bad_data(lambda c: _truncate(c / "test" / "good" / "001.png"),
                                                           "data.num_workers=2"),
         ("cannot read image", "test/good/001.png", "replace or delete")),
    Case("zero-byte image", _bad_data(lambda c: _write(c / "train" / "good" / "002.png", b"")),
         ("empty (0 bytes)", "train/good/002.png", "replace it or delete")),
    Case("text file named .png", _bad_data(lambda c: _write(c / "test" / "good" / "000.png", b"not a picture\n")),
         ("cannot read image", "test/good/000.png", "not an image")),
    Case("1x1 image", _bad_data(lambda c: _image(c / "train" / "good" / "004.png", (1, 1))),
         ("train/good/004.png is only 1x1 pixels", "replace it or delete")),
    Case("unreadable mask", _bad_data(lambda c: _write(c / "ground_truth" / "scratch" / "000_mask.png", b"%PDF-1.4")),
         ("cannot read image", "000_mask.png", "replace or delete")),
    Case("truncated mask", _bad_data(lambda c: _truncate(c / "ground_truth" / "dent" / "001_mask.png")),
         ("cannot read image", "001_mask.png")),
    Case("defect image without mask", _bad_data(lambda c: (c / "ground_truth" / "scratch" / "002_mask.png").unlink()),
         ("test/scratch/002.png has no ground-truth mask", "restore it")),
    Case("broken link among the training images",
         _bad_data(lambda c: (c / "train" / "good" / "009.png").symlink_to(c / "gone.png")),
         ("train/good/009.png is a broken link (to", "gone.png", "remove the link")),
    Case("more exemplars than training images", lambda w: ["memory.exemplars=1000"],
         ("memory.exemplars=1000", "only 6 images", "at most 6")),
    # The teacher's weights.
    Case("teacher weights missing", lambda w: [f"model.teacher_weights={w.tmp / 'none.pth'}"],
         ("none.pth does not exist", "resnet18 state_dict")),
    Case("teacher weights a folder", lambda w: [f"model.teacher_weights={w.tmp}"],
         ("is a folder", "resnet18 state_dict file")),
    Case("teacher weights of resnet34", lambda w: [_teacher_file(w, "r34.pth", models.resnet34().state_dict())],
         ("does not fit backbone resnet18", "unexpected", "set model.backbone")),
    Case("teacher weights of mobilenet_v2",
         lambda w: [_teacher_file(w, "mnv2.pth", models.mobilenet_v2().state_dict())],
         ("does not fit backbone resnet18", "missing")),
    Case("teacher weights not a state dict", lambda w: [_teacher_file(w, "dict.pth", {"epoch": 3, "lr": 0.1})],
         ("hold no state_dict", "torch.save(model.state_dict(), path)")),
    Case("teacher weights corrupt", lambda w: [_teacher_file(w, "junk.pth", b"PK\x03\x04" + bytes(range(256)) * 8)],
         ("cannot read teacher weights", "junk.pth", "give a state_dict")),
    # Output and checkpoints.
    Case("output folder under a file",  # unwritable even for root, unlike a chmod-ed folder
         lambda w: [f"output.dir={w.finished / 'memkd-st' / 'mvtec' / 'widget' / 'results.json' / 'sub'}"],
         ("cannot write to", "results.json/sub", "writable folder")),
    Case("output folder a dangling link", lambda w: [f"output.dir={_dangling_link(w)}"],
         ("is a broken link (to", "gone", "set output.dir")),
    Case("phase=test without a checkpoint", lambda w: ["phase=test", f"output.dir={w.tmp / 'empty'}"],
         ("no checkpoint at", "best.pt", "train first")),
    Case("phase=test with a corrupt best.pt", _corrupt_checkpoint("best.pt", "phase=test"),
         ("checkpoint", "best.pt is corrupt or unreadable", "train.resume=false")),
    Case("resume from a corrupt last.pt", _corrupt_checkpoint("last.pt"),
         ("checkpoint", "last.pt is corrupt or unreadable", "train.resume=false")),
    Case("phase=test with another L", lambda w: ["phase=test", "memory.slots=7"],
         ("made with another config", "memory.slots=50 (checkpoint) vs 7 (now)", "another output.dir")),
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(dataset root, output folder holding one finished run of it)."""
    data = make_mvtec_folder(tmp_path_factory.mktemp("data"), "widget")
    out = tmp_path_factory.mktemp("finished")
    assert main("st", run_args(data, out)) == 0
    assert (out / "memkd-st" / "mvtec" / "widget" / "results.json").is_file()
    return data, out


def test_the_table_covers_at_least_twenty_distinct_inputs() -> None:
    assert len(CASES) >= 20 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_one_line_and_exit_code_2(case: Case, finished: tuple[Path, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    data, out = finished
    world = World(data, out, tmp_path)
    args = run_args(data, out, *case.args(world))
    protected = Path(next(a for a in reversed(args) if a.startswith("output.dir=")).split("=", 1)[1])
    before = snapshot(protected) if protected.is_dir() else {}
    finished_before = snapshot(out)
    case.setup(monkeypatch)
    capsys.readouterr()

    code = main("st", args)

    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in case.says:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert (snapshot(protected) if protected.is_dir() else {}) == before
    assert snapshot(out) == finished_before


@pytest.mark.slow
@pytest.mark.parametrize("extra, says", [
    (["train.epoch=3"], "unknown config key 'train.epoch'"),
    (["data.root=/nonexistent/mvtec", "data.category=bottle"], "data not found"),
])
def test_as_a_subprocess_exit_code_2_and_no_traceback(extra: list[str], says: str, finished: tuple[Path, Path]) -> None:
    data, out = finished
    before = snapshot(out)
    result = subprocess.run([sys.executable, "trainRM_ST.py", *run_args(data, out, *extra)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and says in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert snapshot(out) == before


@pytest.mark.slow
def test_debug_shows_the_traceback(finished: tuple[Path, Path]) -> None:
    data, out = finished
    with pytest.raises(UserError, match="data not found"):
        main("st", run_args(data, out, "data.root=/nonexistent/mvtec", "data.category=bottle", "--debug"))
    result = subprocess.run([sys.executable, "trainRM_ST.py", "train.epoch=3", "--debug"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "utils.errors.UserError: unknown config key 'train.epoch'" in result.stderr


def test_an_image_broken_inside_a_loader_worker_is_still_one_line(tmp_path: Path) -> None:
    """Without the up-front decode (e.g. a file broken while the run is going), a worker raises it."""
    from datasets.samples import AnomalyDataset, Sample

    path = tmp_path / "broken.png"
    Image.fromarray(np.full((64, 64, 3), 100, np.uint8)).save(path)
    _truncate(path)
    loader = DataLoader(AnomalyDataset([Sample(path, 0)], 32), batch_size=1, num_workers=1)
    with pytest.raises(UserError) as raised:
        next(iter(loader))
    message = str(raised.value)
    assert message.startswith(f"cannot read image {path}") and "\n" not in message
    assert "DataLoader worker" in "".join(raised.value.__notes__)  # --debug still shows where it happened


def test_a_mask_of_another_size_is_not_an_error(tmp_path: Path) -> None:
    """Decided: a mask whose size differs from its image is resized (nearest) like every mask, not refused."""
    from datasets.build import build_datasets

    root = make_mvtec_folder(tmp_path, "widget")
    mask = root / "widget" / "ground_truth" / "scratch" / "000_mask.png"
    big = np.zeros((96, 80), np.uint8)
    big[10:40, 20:60] = 255
    Image.fromarray(big).save(mask)
    test = build_datasets("mvtec", root, "widget", 64, 0.25, 0).test
    item = next(test[i] for i in range(len(test)) if test[i]["path"].endswith("scratch/000.png"))
    assert item["mask"].shape == (1, 64, 64) and set(item["mask"].unique().tolist()) == {0.0, 1.0}
