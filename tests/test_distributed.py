"""torchrun: sweeps spread over processes, data-parallel training of one category, run locks.

Each test starts real processes on this machine (torchrun's standalone rendezvous on loopback,
the gloo backend on CPU), as a user would.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.fixtures import make_user_folder
from engine.cli import main
from utils.distributed import ShardedBatches, World, average_gradients
from utils.locks import RunLock

# End to end: each test trains through the scripts, runs benchmarks or several processes.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CATEGORIES = ("aa", "bb", "cc")


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("world") / "data"
    for category in CATEGORIES:
        make_user_folder(root, category=category, n_good=10, defects={"crack": 3}, n_test_good=3, size=64)
    return root


def sweep_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["data.dataset=folder", f"data.root={root}", "data.category=all", "data.image_size=64",
            "data.num_workers=0", "data.val_fraction=0.25", "model.backbone=resnet18", "model.pretrained=false",
            "train.epochs=1", "train.batch_size=4", "eval.batch_size=4", "memory.exemplars=2", "train.device=cpu",
            "eval.max_pictures=0", f"output.dir={out}", *extra]


def torchrun(nproc: int, script: str, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           str(ROOT / script), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def metrics(summary: Path) -> list[tuple]:
    data = json.loads(summary.read_text())
    return [(r["category"], r["image_auroc"], r["pixel_auroc"], r["pixel_aupro"]) for r in data["categories"]]


def test_a_two_process_sweep_trains_each_category_once_and_writes_one_summary(folder_root, tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main("st", sweep_args(folder_root, one)) == 0
    done = torchrun(2, "trainRM_ST.py", sweep_args(folder_root, two))
    assert done.returncode == 0, done.stderr[-2000:]
    summary = Path("memkd-st/folder/summary.json")
    assert metrics(two / summary) == metrics(one / summary)  # same content as a single-process sweep
    assert done.stdout.count("summary: ") == 1  # printed and written once, by rank 0
    # Every category trained by exactly one process: a process announces a category only once its
    # run folder is locked; the others skip it (or, once it is done, reuse its results).
    trained = sorted(line.split("|")[1].strip() for line in done.stdout.splitlines()
                     if line.startswith("MemKD-ST | folder/"))
    assert trained == [f"folder/{c}" for c in CATEGORIES]
    # A rerun with another world size skips every finished category.
    capsys.readouterr()
    assert main("st", sweep_args(folder_root, two)) == 0
    assert capsys.readouterr().out.count("reusing the finished run") == len(CATEGORIES)


def test_data_parallel_training_of_one_category(folder_root, tmp_path):
    out = tmp_path / "out"
    args = sweep_args(folder_root, out, "train.parallel=data", "data.category=aa", "train.epochs=2")
    done = torchrun(2, "trainRM_ST.py", args)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "memkd-st/folder/aa/results.json").read_text())
    assert results["world_size"] == 2 and results["config"]["train.parallel"] == "data"
    assert 0.0 <= results["pixel_auroc"] <= 1.0 and results["train_seconds"] > 0
    assert done.stdout.count("results: ") == 1  # rank 0 alone evaluates and writes


def test_the_ranks_share_every_batch_of_the_same_seeded_shuffle():
    order = torch.randperm(23, generator=torch.Generator().manual_seed(11)).tolist()
    batches = [order[i:i + 5] for i in range(0, 23, 5)]
    assert list(ShardedBatches(23, 5, torch.Generator().manual_seed(11), World())) == batches
    halves = [list(ShardedBatches(23, 5, torch.Generator().manual_seed(11), World(r, 2))) for r in range(2)]
    assert [sorted(a + b) for a, b in zip(*halves)] == [sorted(b) for b in batches]
    assert all(not set(a) & set(b) for a, b in zip(*halves))  # no image twice in one global batch


def _rank_gradients(rank: int, init: str, images: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
    half = images[rank::2]
    model(half).pow(2).mean().backward()
    average_gradients(list(model.parameters()), World(rank, 2))
    torch.save([p.grad for p in model.parameters()], f"{out}.{rank}")
    dist.destroy_process_group()


def test_averaged_gradients_of_two_halves_are_the_full_batch_gradient(tmp_path):
    images = torch.randn(6, 3, 8, 8)
    mp.spawn(_rank_gradients, args=(f"file://{tmp_path / 'rendezvous'}", images, str(tmp_path / "grads")), nprocs=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
    model(images).pow(2).mean().backward()
    for rank in range(2):
        for ours, full in zip(torch.load(tmp_path / f"grads.{rank}"), (p.grad for p in model.parameters())):
            assert torch.allclose(ours, full, atol=1e-6)


def test_a_run_folder_held_by_a_live_process_is_refused_naming_it(folder_root, tmp_path, capsys):
    out = tmp_path / "out"
    args = sweep_args(folder_root, out, "data.category=aa")
    folder = out / "memkd-st/folder/aa"
    holder = RunLock(folder)
    assert holder.acquire()
    try:
        assert main("st", args) == 2
        line = capsys.readouterr().err.strip()
        assert line.startswith("error: run folder") and f"process {os.getpid()}" in line and "\n" not in line
        assert not (folder / "results.json").exists()
    finally:
        holder.release()


def test_a_lock_left_by_a_killed_process_does_not_block_the_rerun(folder_root, tmp_path):
    out = tmp_path / "out"
    folder = out / "memkd-st/folder/aa"
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from utils.locks import RunLock; "
            "assert RunLock(sys.argv[2]).acquire(); print('locked', flush=True); time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        assert not RunLock(folder).acquire()
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
    with RunLock(folder) as lock:  # the kernel dropped the dead holder's lock at once
        assert lock.acquire()
    assert main("st", sweep_args(folder_root, out, "data.category=aa")) == 0


def test_a_worker_ends_when_its_launcher_is_killed(tmp_path):
    """As a SIGKILLed torchrun leaves its ranks: the launcher dies, the worker must notice and exit."""
    import signal
    import time

    pid_file = tmp_path / "worker.pid"
    worker = ("import sys, time; sys.path.insert(0, {root!r}); from utils.distributed import exit_with_parent; "
              "exit_with_parent(0.1); open({pid!r}, 'w').write(str(__import__('os').getpid())); time.sleep(60)")
    launcher = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {worker!r}]); time.sleep(60)")
    code = launcher.format(worker=worker.format(root=str(Path(__file__).resolve().parent.parent), pid=str(pid_file)))
    parent = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the worker did not start"
        time.sleep(0.05)
    worker_pid = int(pid_file.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    while time.monotonic() < deadline:
        try:
            os.kill(worker_pid, 0)
        except ProcessLookupError:
            return  # gone
        if Path(f"/proc/{worker_pid}/stat").read_text().split(")")[1].split()[0] == "Z":
            return  # exited, waiting for its new parent to reap it
        time.sleep(0.1)
    os.kill(worker_pid, signal.SIGKILL)
    raise AssertionError("the worker outlived its launcher")
