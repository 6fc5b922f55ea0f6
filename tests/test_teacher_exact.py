"""The teacher is exactly the weights it was built from, and nothing a run does changes it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.model import build_run_model
from models.feature_extractor import build_network, is_head
from models.registry import BACKBONES
from models.teacher_weights import fingerprint_weights
from tests.fixtures import make_mvtec_folder, tiny_run_args
from engine.config import load_config


def generated_weights(backbone: str, path: Path) -> dict[str, torch.Tensor]:
    """A full state_dict unlike any initialisation: random weights AND random BatchNorm statistics,
    so that a BatchNorm which folded even one batch into its running stats shows up."""
    torch.manual_seed(123)
    state = build_network(backbone).state_dict()
    for key, tensor in state.items():
        if key.endswith("running_var"):
            state[key] = torch.rand_like(tensor) + 0.5
        elif key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif tensor.is_floating_point():
            state[key] = torch.randn_like(tensor) * 0.05
    torch.save(state, path)
    return state


def assert_teacher_is(model, source: dict[str, torch.Tensor]) -> None:
    used = model.teacher.network_state_dict()
    assert used, "the teacher holds no tensors"
    for key, tensor in used.items():
        assert torch.equal(tensor, source[key]), f"teacher tensor {key} differs from the loaded weights"
    # Every tensor of the layers the teacher keeps was compared, parameters and buffers alike.
    kept_prefixes = {key.rsplit(".", 1)[0].split(".")[0] for key in used}
    assert any(key.endswith("running_mean") for key in used) and any(key.endswith("num_batches_tracked") for key in used)
    assert len(used) >= len([k for k in source if not is_head(k)]) // 3 and kept_prefixes


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_the_built_teacher_equals_its_weights_tensor_by_tensor(backbone, tmp_path):
    source = generated_weights(backbone, tmp_path / "teacher.pth")
    config = load_config("st", ["model.pretrained=false", f"model.backbone={backbone}",
                                f"model.teacher_weights={tmp_path / 'teacher.pth'}"])
    model = build_run_model(config)
    assert_teacher_is(model, source)
    assert model.teacher_fingerprint == fingerprint_weights(source)


@pytest.mark.slow
def test_training_and_evaluation_never_change_the_teacher(tmp_path):
    from datasets.build import build_datasets
    from engine.evaluation import anomaly_maps
    from engine.records import DataDigests, Run
    from engine.training import train

    source = generated_weights("resnet18", tmp_path / "teacher.pth")
    root = make_mvtec_folder(tmp_path / "data")
    config = load_config("rd", tiny_run_args(root, tmp_path / "out", f"model.teacher_weights={tmp_path / 'teacher.pth'}",
                                             epochs=2))
    model = build_run_model(config)
    splits = build_datasets("mvtec", root, "widget", 64, 0.25, 0)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    train(model, splits, Run(config, "widget", run_dir, torch.device("cpu"), DataDigests("digest", "digest")))
    anomaly_maps(model, splits.test, config, torch.device("cpu"))
    assert_teacher_is(model, source)


def test_the_fingerprint_is_of_the_source_weights_not_of_the_module(tmp_path):
    source = generated_weights("resnet18", tmp_path / "teacher.pth")
    changed = dict(source)
    changed["layer1.0.bn1.running_mean"] = source["layer1.0.bn1.running_mean"] + 1e-3
    assert fingerprint_weights(changed) != fingerprint_weights(source)
    # The head is not part of the teacher: files that differ only there are the same teacher.
    other_head = dict(source, **{"fc.weight": torch.zeros_like(source["fc.weight"])})
    assert fingerprint_weights(other_head) == fingerprint_weights(source)


def test_a_checkpoint_of_the_old_format_is_refused_saying_why(tmp_path):
    from engine.checkpoint import load_checkpoint
    from utils.errors import UserError

    torch.save({"format_version": 1, "method": "st", "student": {}}, tmp_path / "best.pt")
    with pytest.raises(UserError, match="format version 1.*perturbed.*train.resume=false"):
        load_checkpoint(tmp_path / "best.pt")
