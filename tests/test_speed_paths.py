"""The speed paths compute what the plain ones do, up to float rounding: channels_last, batch norms
folded into convolutions for inference (the memory's reads: tests/test_memory_read.py); and none of them touches
the teacher's weights, what training computes or what a checkpoint holds."""
from pathlib import Path

import pytest
import torch

from datasets.build import build_datasets
from engine.model import build_run_model
from models.feature_extractor import FeatureExtractor
from models.registry import BACKBONES
from models.memory import MemoryFusion
from tests.fixtures import make_mvtec_folder
from models.folding import fold_batchnorms, folded_for_inference, inference_copy
from utils.device import memory_format, to_device
from engine.config import RunSettings, load_config
from engine.evaluation import anomaly_maps

SIZE = 64


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_mvtec_folder(tmp_path_factory.mktemp("mvtec"), "widget", n_train=8, n_good_test=2, n_defect=2)


def tiny_config(method: str, data_root: Path, out: Path, channels_last: bool) -> dict:
    config = load_config(method, [f"data.root={data_root}", "data.category=widget", f"data.image_size={SIZE}",
                                  "data.num_workers=0", "data.val_fraction=0.25", "model.backbone=resnet18",
                                  "model.pretrained=false", "train.epochs=2", "train.batch_size=3",
                                  "eval.batch_size=4", "memory.exemplars=2", "train.device=cpu", f"output.dir={out}"])
    config = config.replace({"train.feature_cache": "float32", "train.cache_budget_mb": 4096, "train.channels_last": channels_last})
    return config


def test_fusion_gradients_match_in_both_layouts():
    torch.manual_seed(0)
    fusion = MemoryFusion(channels=8, slots=5, temperature=0.1)
    grads = []
    for layout in (torch.contiguous_format, torch.channels_last):
        fusion.zero_grad()
        x = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=layout)
        out, _ = fusion(x)
        out.square().sum().backward()
        grads.append([p.grad.clone() for p in fusion.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4 * b.abs().max().item())


@pytest.mark.parametrize("channels_last", [True, False])
def test_the_saved_networks_keep_their_weights_and_layout(channels_last, data_root, tmp_path):
    config = tiny_config("st", data_root, tmp_path, channels_last)
    model = build_run_model(config)
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    images = to_device(torch.randn(2, 3, SIZE, SIZE), torch.device("cpu"), config.train.channels_last)
    assert images.is_contiguous(memory_format=torch.channels_last) == channels_last
    plain = model.teacher_features(images)  # the teacher itself: what training computes
    with torch.no_grad(), folded_for_inference(model.eval(), memory_format(config.train.channels_last)):
        folded = model.teacher_features(images)  # the folded copy, in the configured layout
        assert all(f.is_contiguous(memory_format=torch.channels_last) == channels_last for f in folded)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * a.abs().max().item()) for a, b in zip(plain, folded))
    assert all(torch.equal(a, b) for a, b in zip(plain, model.teacher_features(images)))  # unfolded again after
    teacher_after = model.teacher.state_dict()
    assert teacher_after.keys() == teacher_before.keys()
    assert all(torch.equal(teacher_after[k], v) and teacher_after[k].is_contiguous() for k, v in teacher_before.items())
    assert all(t.is_contiguous() for t in model.student.state_dict().values())  # checkpoints keep their layout
    model.train().set_exemplars(images)
    model.loss(images)["loss"].backward()  # the student's gradients land in its own (contiguous) layout
    assert all(p.grad is None or p.grad.is_contiguous() for p in model.student.parameters())


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_a_folded_teacher_gives_the_teachers_features(backbone):
    teacher = FeatureExtractor(backbone, frozen=True)
    with torch.no_grad():  # ImageNet-like statistics, so that folding has real scales to fold
        for m in teacher.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
    folded = inference_copy(teacher, torch.channels_last)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(teacher(images), folded(images.contiguous(memory_format=torch.channels_last))):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * a.abs().max().item())


@pytest.mark.parametrize("method", ["st", "rd"])
def test_maps_through_folded_networks_are_the_trained_models(method, data_root, tmp_path):
    config = tiny_config(method, data_root, tmp_path, False)
    model = build_run_model(config)
    model.set_exemplars(torch.randn(2, 3, SIZE, SIZE))
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.01)
    for _ in range(3):  # moves the batch-norm statistics and weights away from their initial values
        optimizer.zero_grad()
        model.loss(torch.randn(4, 3, SIZE, SIZE))["loss"].backward()
        optimizer.step()
    model.eval()
    trained = model.student
    images = torch.randn(3, 3, SIZE, SIZE)
    expected = model.anomaly_map(images)
    with folded_for_inference(model, memory_format(config.train.channels_last)):
        assert model.student is not trained
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.student.modules())
        got = model.anomaly_map(images)
    assert model.student is trained and any(isinstance(m, torch.nn.BatchNorm2d) for m in trained.modules())
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_batch_norms_fold_only_in_eval_mode():
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorms(network)
    assert fold_batchnorms(network.eval()) == 1 and isinstance(network[1], torch.nn.Identity)


def first_step(method: str, config: RunSettings, images: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> tuple[float, torch.Tensor]:
    """The loss of a fresh model's first training step and its gradient, flattened, computed in
    ``dtype`` in the layout ``config`` asks for."""
    model = build_run_model(config).to(dtype).train()
    layout = memory_format(config.train.channels_last)
    images = images.to(dtype).contiguous(memory_format=layout)
    model.set_exemplars(images[:2])
    loss = model.loss(images)["loss"]
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.trainable_parameters() if p.grad is not None])


@pytest.mark.parametrize("method", ["st", "rd"])
def test_channels_last_trains_what_nchw_trains_up_to_float_rounding(method, data_root, tmp_path):
    # What the layout promises is the same arithmetic up to float rounding: the same first step,
    # as close to NCHW's as float32 itself is to the exact (float64) step. Later steps are no
    # promise: each feeds the previous step's rounding back in, and how far SGD and Adam then
    # drift depends on the CPU's kernels (RD's epoch-2 val_kd was 0.2 % apart on one machine and
    # 1.4 % on another), so no tolerance on them would hold on every machine.
    images = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    nchw = tiny_config(method, data_root, tmp_path, False)
    fast_loss, fast_grad = first_step(method, tiny_config(method, data_root, tmp_path, True), images)
    plain_loss, plain_grad = first_step(method, nchw, images)
    exact_loss, exact_grad = first_step(method, nchw, images, torch.float64)
    rounding = (plain_grad.double() - exact_grad).norm()
    assert abs(fast_loss - plain_loss) <= 10 * abs(plain_loss - exact_loss) + 1e-6 * abs(exact_loss)
    assert (fast_grad - plain_grad).double().norm() <= 10 * rounding


@pytest.mark.parametrize("method", ["st", "rd"])
def test_channels_last_evaluation_gives_the_nchw_maps(method, data_root, tmp_path):
    maps = []
    for channels_last in (True, False):
        config = tiny_config(method, data_root, tmp_path, channels_last)
        splits = build_datasets("mvtec", config.data.root, "widget", SIZE, 0.25, 0, False)
        model = build_run_model(config)
        maps.append(anomaly_maps(model, splits.test, config, torch.device("cpu"))["maps"])
    assert torch.allclose(maps[0], maps[1], rtol=1e-4, atol=1e-5 * maps[1].abs().max().item())
