"""Content digests: a file is read once while it stays unchanged, and read again when it changes."""
import hashlib
import os

import pytest
import torch

import utils.digests as digests
from utils.digests import FileDigests, tensors_digest


def test_an_unchanged_file_is_not_read_again_and_a_changed_one_is(tmp_path, monkeypatch):
    data = tmp_path / "a.png"
    data.write_bytes(b"first")
    store = tmp_path / "out" / ".file_digests.json"
    reads = []
    real = digests.file_sha256
    monkeypatch.setattr(digests, "file_sha256", lambda path: reads.append(path) or real(path))

    files = FileDigests(store)
    assert files.sha256(data) == hashlib.sha256(b"first").hexdigest()
    files.save()
    assert FileDigests(store).sha256(data) == hashlib.sha256(b"first").hexdigest()
    assert len(reads) == 1, "read once, then known by path, size and mtime"

    data.write_bytes(b"other")  # same size, other bytes: the modification time moves
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 1_000_000))
    assert FileDigests(store).sha256(data) == hashlib.sha256(b"other").hexdigest()
    assert len(reads) == 2


def test_a_broken_or_unwritable_store_only_costs_time(tmp_path):
    store = tmp_path / "store.json"
    store.write_text("{not json")
    data = tmp_path / "a.png"
    data.write_bytes(b"x")
    files = FileDigests(store)
    assert files.sha256(data) == hashlib.sha256(b"x").hexdigest()
    files.save()
    assert FileDigests(store).sha256(data) == hashlib.sha256(b"x").hexdigest()
    blocked = FileDigests(tmp_path / "a.png" / "store.json")  # its folder is a file
    blocked.sha256(data)
    blocked.save()  # no error: the store is an optimisation


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool])
def test_a_tensor_digest_sees_every_bit_and_skips_what_it_is_told(dtype):
    state = {"a": torch.zeros(3, dtype=dtype), "fc.weight": torch.ones(2, dtype=dtype)}
    flipped = {**state, "a": torch.tensor([0, 1, 0]).to(dtype)}
    assert tensors_digest(state) != tensors_digest(flipped)
    assert tensors_digest(state, skip=lambda name: name.startswith("fc.")) == tensors_digest({"a": state["a"]})


def test_the_digest_benchmark_times_a_first_run_and_a_rerun(tmp_path, capsys):
    from benchmarks.data_digest import main
    from tests.fixtures import make_mvtec_folder

    root = make_mvtec_folder(tmp_path / "data")
    assert main(["--data-root", str(root), "--category", "widget"]) == 0
    line = capsys.readouterr().out
    assert "mvtec/widget: 17 files" in line  # 8 train + 6 test images, 3 masks and "first run" in line and "rerun" in line


def test_compare_runs_finds_a_moved_metric_and_moved_weights(tmp_path, capsys):
    import json

    from benchmarks.compare_runs import main

    def run(root, auroc, weight):
        folder = root / "memkd-st" / "demo" / "brick"
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps({"image_auroc": auroc, "train_seconds": auroc * 7,
                                                         "teacher_fingerprint": "f", "data_digest": "d"}))
        torch.save({"student": {"w": torch.tensor([weight])}}, folder / "best.pt")

    run(tmp_path / "before", 0.9, 1.0)
    run(tmp_path / "same", 0.9, 1.0)
    run(tmp_path / "metric", 0.8, 1.0)
    run(tmp_path / "weights", 0.9, 1.0 + 1e-7)
    assert main([str(tmp_path / "before"), str(tmp_path / "same")]) == 0
    assert "1 of 1 runs identical" in capsys.readouterr().out
    assert main([str(tmp_path / "before"), str(tmp_path / "metric")]) == 1
    assert "image_auroc" in capsys.readouterr().out
    assert main([str(tmp_path / "before"), str(tmp_path / "weights")]) == 1
    assert "best.pt weights differ" in capsys.readouterr().out
