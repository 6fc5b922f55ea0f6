"""train.compile: the compiled training step trains as the plain one, its last partial batch included."""
import json

import pytest
import torch

from engine.cli import main
from engine.config import load_config
from engine.model import build_run_model
from engine.training import loss_function
from tests.fixtures import make_mvtec_folder, tiny_run_args


def test_off_and_cudagraphs_off_cuda_are_the_plain_loss():
    config = load_config("st", ["model.pretrained=false", "model.backbone=resnet18"])
    model = build_run_model(config)
    for mode in ("off", "cudagraphs"):  # no CUDA graphs on the CPU
        assert loss_function(model, config.replace({"train.compile": mode}).train, torch.device("cpu")) == model.loss
    compiled = loss_function(model, config.replace({"train.compile": "step"}).train, torch.device("cpu"))
    assert compiled != model.loss


@pytest.mark.slow
def test_a_compiled_step_trains_as_the_plain_one_including_the_last_partial_batch(tmp_path):
    """train.compile=step on the CPU (TorchInductor's generated kernels): the same losses, epoch by
    epoch, as train.compile=off. 6 training images in batches of 4 end each epoch with a batch of 2,
    which is compiled for its own shape: nothing is padded or dropped. The generated kernels round
    differently (measured: 5e-7 in the first step's loss); at STPM's lr 0.4 with momentum, SGD
    amplifies that to 1 % in val_kd after two epochs of these random images, so the comparison
    runs at a learning rate that leaves rounding as rounding."""
    data_root = make_mvtec_folder(tmp_path / "data", "widget", n_train=8, n_good_test=2, n_defect=2)
    histories = {}
    for mode in ("off", "step"):
        out = tmp_path / mode
        assert main("st", tiny_run_args(data_root, out, f"train.compile={mode}", "train.lr=0.01", epochs=2)) == 0
        histories[mode] = json.loads((out / "memkd-st" / "mvtec" / "widget" / "history.json").read_text())
    plain, compiled = histories["off"], histories["step"]
    assert len(plain) == len(compiled) == 2
    for plain_epoch, compiled_epoch in zip(plain, compiled):
        for term in ("loss", "kd", "nm", "orth", "val_kd"):
            assert compiled_epoch[term] == pytest.approx(plain_epoch[term], rel=1e-4), term
